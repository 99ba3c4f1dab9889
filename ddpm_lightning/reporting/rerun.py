"""More seeds for the undecided rows (``ddpm-report --add-seeds K``): one ``ddpm-train -m`` / ``ddpm-eval -m``
command per row whose primary-metric verdict is inconclusive, plus the baseline (a paired difference needs both
sides at the new seeds), each with K new values of the seed the intervals are over and the row's other overrides as
its jobs ran them, into ``<sweep>/added_seeds/<seed key>_<first>-<last>/<row>``.

The report seeds of a held-out selection run for the chosen rows only (``plan_report_seeds``, ``report_seeds.sh``):
a two-stage selection runs every row on the selection seeds, then ``ddpm-report --report-seeds`` names seeds the
sweep does not have yet and writes one command per chosen row into ``<sweep>/report_seeds/<seed key>_<seeds>/<row>``
(half the jobs of running every row on both sets).

``find_job_folders`` walks into that folder, so the next ``ddpm-report <sweep>`` aggregates the old and the new
seeds of a row together (``collect_runs`` keeps the added jobs after the others). Re-running a command resumes its
sweep (finished jobs are skipped), as for any sweep; the next ``--add-seeds`` picks seeds after the largest one
present, so it writes into a new folder.
"""

from __future__ import annotations

import hashlib
import re
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..artifacts import write_text
from ..sweeps import CONTINUES_SWEEP_ENV
from .read import ADDED_SEEDS_DIR, REPORT_SEEDS_DIR, override_dict
from .select import Selection
from .stats import Aggregate, RowGroup, SweepTable

ENTRY_POINTS = {"train": "ddpm-train", "eval": "ddpm-eval"}
SCRIPT = "add_seeds.sh"
REPORT_SCRIPT = "report_seeds.sh"


@dataclass
class AddSeedsPlan:
    """The new seeds, the rows they go to and one shell command per row."""

    key: str
    seeds: list[int]
    rows: list[str]  # row labels, the baseline first
    undecided: list[str]  # the inconclusive rows among them
    commands: list[str]
    folder: Path  # <sweep>/added_seeds/<key>_<first>-<last>


@dataclass
class ReportSeedsPlan:
    """The report seeds the chosen rows of a held-out selection lack, and one shell command per such row."""

    key: str
    seeds: list[str]
    rows: list[str]  # the chosen rows with a missing report seed
    commands: list[str]
    folder: Path  # <sweep>/report_seeds/<key>_<seeds>


def _hydra_value(text: str) -> str:
    """``text`` as a Hydra override value: as it is when plain, else quoted."""
    if re.fullmatch(r"[\w./:-]+", text):
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


SLUG_MAX = 96  # a row's folder name: file systems allow 255 bytes; a row of many overrides (paths) is longer


def _slug(label: str) -> str:
    """A row label as a folder name: readable, and within ``SLUG_MAX`` characters (a longer one keeps its start
    and ends in a hash of the whole label, so two rows never share a folder)."""
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", label.replace("=", "-")).strip("_") or "row"
    if len(slug) <= SLUG_MAX:
        return slug
    return f"{slug[:SLUG_MAX - 13].rstrip('_.-')}-{hashlib.sha256(label.encode()).hexdigest()[:12]}"


def undecided_rows(aggregate: Aggregate) -> list[int]:
    """Rows (indices) whose verdict against the baseline on the primary metric is inconclusive."""
    return [i for i, group in enumerate(aggregate.groups)
            if i != aggregate.baseline and aggregate.metric in group.vs_baseline
            and group.vs_baseline[aggregate.metric].verdict == "inconclusive"]


def plan_added_seeds(aggregate: Aggregate, table: SweepTable, sweep_dir: str | Path, count: int) -> AddSeedsPlan:
    """The commands that run ``count`` new seeds for every undecided row and the baseline. ValueError for
    ``count`` < 1, several unit seed keys, or seeds that are not integers."""
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"--add-seeds needs a number of new seeds >= 1, got {count!r}")
    if len(aggregate.unit_axes) != 1:
        raise ValueError("--add-seeds adds values of one seed key; the units of this sweep vary in "
                         + " and ".join(aggregate.unit_axes))
    key = aggregate.unit_axes[0]
    present = {values.get(key) for group in aggregate.groups for values in map(_seed_values, group.expected)}
    try:
        start = max(int(v) for v in present if v not in (None, "")) + 1
    except ValueError:
        raise ValueError(f"--add-seeds counts on from integer seeds; `{key}` has "
                         + ", ".join(sorted(str(v) for v in present))) from None
    seeds = list(range(start, start + count))
    folder = Path(sweep_dir).absolute() / ADDED_SEEDS_DIR / f"{key}_{seeds[0]}-{seeds[-1]}"
    undecided = undecided_rows(aggregate)
    chosen = [aggregate.baseline, *undecided] if undecided else []
    commands = [_command(aggregate, aggregate.groups[i], key, seeds, folder / _slug(aggregate.groups[i].label))
                for i in chosen]
    return AddSeedsPlan(key=key, seeds=seeds, rows=[aggregate.groups[i].label for i in chosen],
                        undecided=[aggregate.groups[i].label for i in undecided], commands=commands, folder=folder)


def _seed_values(label: str) -> dict[str, str]:
    return override_dict(label.split())


def _seed_order(value: str) -> tuple:
    return (0, int(value), value) if re.fullmatch(r"-?\d+", value) else (1, 0, value)


def _command(aggregate: Aggregate, group: RowGroup, key: str, seeds: list[int], folder: Path) -> str:
    run = next((r for r in group.runs if r.status == "completed"), group.runs[0])
    seed_axes = set(aggregate.seed_axes)
    overrides = [o for o in run.overrides if next(iter(override_dict([o]))) not in seed_axes]
    inner = []
    for axis in aggregate.inner_axes:  # sampling seeds inside each training seed: the same ones again
        values = sorted({_seed_values(label).get(axis, "") for label in group.expected} - {""}, key=_seed_order)
        inner.append(f"{axis}={','.join(values)}")
    arguments = [ENTRY_POINTS.get(run.kind, "ddpm-train"), "-m", *overrides, f"{key}={','.join(map(str, seeds))}",
                 *inner, f"hydra.sweep.dir={_hydra_value(str(folder))}"]
    return shlex.join(arguments)


def plan_report_seeds(aggregate: Aggregate, selections: Sequence[Selection], sweep_dir: str | Path) -> ReportSeedsPlan:
    """The commands that run, for each selection's chosen row, the report seeds it has no completed job at (the
    second stage of a held-out selection); none when every chosen row has them all."""
    key, seeds = selections[0].axis, selections[0].report_seeds
    folder = Path(sweep_dir).absolute() / REPORT_SEEDS_DIR / _slug(f"{key}_{'-'.join(seeds)}")
    rows, commands = [], []
    for selection in selections:
        label = selection.candidates[selection.chosen][0]
        group = next(g for g in aggregate.groups if g.label == label)
        done = {unit.split("=", 1)[1] for unit in group.units.get(aggregate.metric, {})}
        missing = [seed for seed in seeds if seed not in done]
        if missing and label not in rows:
            rows.append(label)
            commands.append(_command(aggregate, group, key, missing, folder / _slug(label)))
    return ReportSeedsPlan(key=key, seeds=list(seeds), rows=rows, commands=commands, folder=folder)


def report_seeds_lines(plan: ReportSeedsPlan, script: Path) -> list[str]:
    """The markdown section: what ``report_seeds.sh`` runs (nothing when no chosen row lacks a report seed)."""
    if not plan.commands:
        return []
    return ["## Report seeds to run", "",
            f"The chosen row(s) {', '.join(f'`{r}`' for r in plan.rows)} have no result yet at report seed(s) "
            f"`{plan.key}` = {', '.join(plan.seeds)}: `{script}` runs them (the chosen rows only) into "
            f"`{plan.folder}` (`ddpm-report --launch` runs it); the same `ddpm-report` command then reports them. "
            "Re-running it resumes (finished jobs are skipped).", ""]


def add_seeds_lines(plan: AddSeedsPlan, script: Path) -> list[str]:
    """The markdown section: what ``add_seeds.sh`` runs."""
    if not plan.commands:
        return ["## Added seeds", "", "No row is inconclusive on the primary metric: no command written.", ""]
    seeds = ", ".join(map(str, plan.seeds))
    return ["## Added seeds", "",
            f"`{script}` runs `{plan.key}` = {seeds} for the {len(plan.undecided)} inconclusive row(s) "
            f"({', '.join(f'`{r}`' for r in plan.undecided)}) and the baseline `{plan.rows[0]}`, into "
            f"`{plan.folder}`; `ddpm-report` on this sweep then aggregates the old and new seeds together. "
            "Re-running it resumes (finished jobs are skipped).", ""]


def write_add_seeds(plan: AddSeedsPlan | ReportSeedsPlan, path: str | Path) -> Path:
    """``add_seeds.sh`` / ``report_seeds.sh``: the commands, one per row, stopping at the first that fails."""
    what = ("the report seeds of the chosen rows" if isinstance(plan, ReportSeedsPlan)
            else "new seeds for the inconclusive rows and the baseline")
    sweep = plan.folder.parent.parent  # <sweep>/{report_seeds,added_seeds}/<key>_<seeds>
    lines = ["#!/usr/bin/env bash", f"# written by ddpm-report: {what}", "set -euo pipefail",
             f"export {CONTINUES_SWEEP_ENV}={shlex.quote(str(sweep))}  # these jobs continue that sweep",
             *plan.commands]
    path = write_text(Path(path), "\n".join(lines) + "\n")
    path.chmod(0o755)
    return path
