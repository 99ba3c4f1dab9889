"""Held-out selection (``ddpm-report --select``): choose a row (a checkpoint, an EMA length, a guidance scale) by
the primary metric over one set of seeds, and report the chosen row's metrics over a disjoint set.

Choosing the best of N rows and reporting its value on the same seeds reports the luckiest draw (the best-of-N
bias). Here the seeds of the unit axis (the sampling seed of a ``ddpm-eval`` sweep, the training seed of a
``ddpm-train`` one) are split in two: the selection seeds rank the rows, only the report seeds give the reported
means and intervals, and both sets are named in the report and in ``selection.json``.

``select_rows(..., per=KEYS)`` chooses once per group of rows (``--select-per``): rows with the same values of the
override keys ``KEYS``, where the key ``guidance`` is the row's guidance method (``guidance_method``: unguided,
classifier, cfg, autoguidance, "+interval" when an interval restricts it), so a sweep of several guidance methods
gets each method's best setting, chosen and reported on the same seed sets. ``compare_selections`` then compares
the chosen rows with each other on the report seeds only (paired by seed, corrected over all its verdicts): "does
autoguidance at its best scale beat CFG at its best" answered without reusing the seeds that chose the scales.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config.choices import GUIDANCE_METHODS
from .display import arrow, display_name, fmt, stats_cell
from .read import COST_KEYS, override_dict
from .stats import (
    CONFIDENCE,
    Aggregate,
    RowGroup,
    Stats,
    summarize,
)

GUIDANCE_GROUP = "guidance"  # the --select-per key that groups rows by guidance method


@dataclass
class Selection:
    """The split, the candidates' primary metric over the selection seeds, the chosen row and its metrics over
    the report seeds."""

    axis: str  # the seed key that is split
    unit_kind: str  # "sampling seed" | "training seed"
    metric: str
    mode: str
    selection_seeds: list[str]
    report_seeds: list[str]
    candidates: list[tuple[str, dict[str, str], Stats]]  # row label, its overrides, the metric over selection seeds
    chosen: int  # index into candidates
    reported: dict[str, Stats]  # metric -> the chosen row over the report seeds
    reported_values: dict[str, dict[str, float]]  # metric -> report seed -> value
    group: str | None = None  # the rows it chose among (``select_rows(..., per=...)``); None: every row


def seed_order(value: str) -> tuple:
    try:
        return (0, float(value), value)
    except ValueError:
        return (1, 0.0, value)


def _seed_list(seeds: Sequence[Any] | str | None) -> list[str] | None:
    if seeds is None:
        return None
    items = seeds.split(",") if isinstance(seeds, str) else [str(s) for s in seeds]
    return list(dict.fromkeys(s.strip() for s in items if s.strip()))


def split_seeds(aggregate: Aggregate, select_seeds: Sequence[Any] | str | None = None,
                report_seeds: Sequence[Any] | str | None = None) -> tuple[str, list[str], list[str]]:
    """(seed key, selection seeds, report seeds). Default: the seeds with a result, in order, the first half to
    select on and the rest to report on; one set given: the other is the rest. Report seeds without results are
    allowed (a two-stage selection: the chosen rows run them, ``rerun.plan_report_seeds``). ValueError (one line)
    for a sweep with fewer than 2 seeds (1 when the report seeds are still to run) or several unit seed keys,
    selection seeds it does not have, overlapping or empty sets."""
    if len(aggregate.unit_axes) != 1:
        raise ValueError("held-out selection splits one seed key; the units of this sweep vary in "
                         + " and ".join(aggregate.unit_axes))
    axis = aggregate.unit_axes[0]
    present = sorted({label.split("=", 1)[1] for group in aggregate.groups for units in group.units.values()
                      for label in units}, key=seed_order)
    if len(present) < (1 if report_seeds is not None else 2):
        raise ValueError(f"held-out selection needs at least 2 values of `{axis}` with results (one set to select "
                         f"on, a disjoint one to report on); this sweep has {len(present)}: {', '.join(present)}")
    chosen, reported = _seed_list(select_seeds), _seed_list(report_seeds)
    unknown = [s for s in chosen or [] if s not in present]
    if unknown:  # report seeds the sweep lacks are allowed: the chosen rows run them (rerun.plan_report_seeds)
        raise ValueError(f"selection seed(s) {', '.join(unknown)}: not a `{axis}` of this sweep with results "
                         f"(it has {', '.join(present)})")
    unknown = [s for s in reported or [] if s not in present and not re.fullmatch(r"-?\d+", s)]
    if unknown:
        raise ValueError(f"report seed(s) {', '.join(unknown)}: not a `{axis}` of this sweep with results (it has "
                         f"{', '.join(present)}) nor an integer seed to run")
    if chosen is None and reported is None:
        chosen = present[:len(present) // 2]
    if chosen is not None and reported is None:
        reported = [s for s in present if s not in chosen]
    elif reported is not None and chosen is None:
        chosen = [s for s in present if s not in reported]
    overlap = [s for s in chosen if s in reported]
    if overlap:
        raise ValueError(f"selection and report seeds share `{axis}` = {', '.join(overlap)}: a held-out report "
                         "needs two disjoint sets")
    if not chosen or not reported:
        empty = "selection" if not chosen else "report"
        raise ValueError(f"no {empty} seeds left: the sweep's `{axis}` = {', '.join(present)}; give both sets")
    return axis, chosen, reported


def select_row(aggregate: Aggregate, select_seeds: Sequence[Any] | str | None = None,
               report_seeds: Sequence[Any] | str | None = None, rows: Sequence[int] | None = None,
               group: str | None = None) -> Selection:
    """Choose the row with the best mean primary metric (``aggregate.metric`` in ``aggregate.mode``) over the
    selection seeds and summarise its metrics over the report seeds only (``split_seeds`` for the sets).
    ``rows``: the candidates' indices (None: every row), named ``group``."""
    if aggregate.metric is None or aggregate.mode is None:
        raise ValueError("held-out selection needs a primary metric (--metric); no run has one")
    axis, chosen_seeds, report = split_seeds(aggregate, select_seeds, report_seeds)

    def over(units: dict[str, float], seeds: Sequence[str]) -> dict[str, float]:
        return {seed: units[f"{axis}={seed}"] for seed in seeds if f"{axis}={seed}" in units}

    candidates = []
    for i, row in enumerate(aggregate.groups):
        values = over(row.units.get(aggregate.metric, {}), chosen_seeds)
        if values and (rows is None or i in rows):
            candidates.append((row, summarize(list(values.values()))))
    if not candidates:
        raise ValueError(f"no row{'' if group is None else f' of {group}'} has `{aggregate.metric}` at the "
                         f"selection seeds `{axis}` = {', '.join(chosen_seeds)}")
    scored = [(stats.mean, i) for i, (_, stats) in enumerate(candidates)]
    best = (min(scored) if aggregate.mode == "min" else max(scored, key=lambda s: (s[0], -s[1])))[1]
    chosen_row = candidates[best][0]
    reported_values = {m: over(units, report) for m, units in chosen_row.units.items()}
    reported_values = {m: v for m, v in reported_values.items() if v}
    return Selection(axis=axis, unit_kind=aggregate.unit_kind, metric=aggregate.metric, mode=aggregate.mode,
                     selection_seeds=chosen_seeds, report_seeds=report,
                     candidates=[(g.label, dict(g.values), s) for g, s in candidates], chosen=best,
                     reported={m: summarize(list(v.values())) for m, v in reported_values.items()},
                     reported_values=reported_values, group=group)


def guidance_method(values: dict[str, str]) -> str:
    """A row's guidance method from its overrides: the kinds that guide (``classifier``: guidance.scale != 0,
    ``cfg``: guidance.cfg_scale != 0, ``autoguidance``: guidance.autoguidance_scale != 1) joined by "+", or
    ``unguided``; "+interval" when guidance.interval or guidance.interval_sigma restricts them to a band of steps."""
    def number(key: str, default: float) -> float:
        try:
            return float(values.get(key) or default)
        except ValueError:
            return default

    on = (number("guidance.scale", 0.0) != 0, number("guidance.cfg_scale", 0.0) != 0,
          number("guidance.autoguidance_scale", 1.0) != 1)
    kinds = [name for name, active in zip(GUIDANCE_METHODS[1:], on, strict=True) if active]
    banded = any(values.get(key) not in (None, "", "null") for key in ("guidance.interval", "guidance.interval_sigma"))
    return "+".join(kinds) + ("+interval" if banded else "") if kinds else GUIDANCE_METHODS[0]


def row_group(row: RowGroup, per: Sequence[str]) -> str:
    """The group of ``row`` by the keys ``per`` (its overrides, those of its first job under the varying ones;
    ``guidance``: ``guidance_method``)."""
    values = {**(override_dict(row.runs[0].overrides) if row.runs else {}), **row.values}
    return " ".join(guidance_method(values) if key == GUIDANCE_GROUP else f"{key}={values.get(key, '')}"
                    for key in per)


def select_rows(aggregate: Aggregate, select_seeds: Sequence[Any] | str | None = None,
                report_seeds: Sequence[Any] | str | None = None,
                per: Sequence[str] | str | None = None) -> list[Selection]:
    """``select_row`` once per group of rows with the same ``row_group(row, per)`` (in the order the groups first
    appear; ``per`` comma-separated or a list), all on the same seed sets; without ``per`` one selection over every
    row. A group without the primary metric at the selection seeds is left out."""
    keys = _seed_list(per) or []
    if not keys:
        return [select_row(aggregate, select_seeds, report_seeds)]
    groups: dict[str, list[int]] = {}
    for i, row in enumerate(aggregate.groups):
        groups.setdefault(row_group(row, keys), []).append(i)
    with_metric = {name: rows for name, rows in groups.items()
                   if any(aggregate.metric in aggregate.groups[i].units for i in rows)}
    if not with_metric:
        raise ValueError(f"no row has `{aggregate.metric}`: nothing to select per {', '.join(keys)}")
    return [select_row(aggregate, select_seeds, report_seeds, rows, name) for name, rows in with_metric.items()]


def selection_lines(selection: Selection, metrics: Sequence[str]) -> list[str]:
    """The markdown section: both seed sets, the candidates over the selection seeds, the chosen row's
    ``metrics`` (those it has) over the report seeds."""
    axis = selection.axis
    selected = f"`{axis}` = {', '.join(selection.selection_seeds)}"
    reported = f"`{axis}` = {', '.join(selection.report_seeds)}"
    label, _, _ = selection.candidates[selection.chosen]
    better = "lowest" if selection.mode == "min" else "highest"
    name = f"{display_name(selection.metric)} {arrow(selection.metric)}"
    within = "" if selection.group is None else f" of {selection.group}"
    lines = [f"## Held-out selection{within}: chosen on {selected}, reported on {reported}", "",
             f"The row with the {better} mean `{selection.metric}` over the selection {selection.unit_kind}s "
             f"({selected}) is chosen; its metrics are reported over the report {selection.unit_kind}s ({reported}) "
             "only, so the reported values carry no best-of-N bias. The ★ best row of the tables below is chosen "
             "and shown on the same seeds: do not report it as a held-out value.", "",
             f"| row | {name}, mean over the selection seeds | n |", "|---|---|---|"]
    for i, (row, _, stats) in enumerate(selection.candidates):
        cell = f"**{row} (chosen)**" if i == selection.chosen else row
        lines.append(f"| {cell.replace('|', chr(92) + '|')} | {fmt(stats.mean)} | {stats.n} |")
    lines += ["", f"Chosen: `{label}`. Its metrics over the report seeds ({reported}): mean ± "
              f"{CONFIDENCE:.0%} t-interval half-width (sd), n:", "", f"| metric | `{label}`, report seeds |",
              "|---|---|"]
    shown = ([m for m in metrics if m in selection.reported]
             or sorted(m for m in selection.reported if m.split("/", 1)[-1] not in COST_KEYS))
    for metric in shown:
        stats = selection.reported[metric]
        lines.append(f"| {display_name(metric)} {arrow(metric)} | {stats_cell(stats)}, n={stats.n} |")
    if not shown:
        lines.append("| (none) | no completed job of this row at the report seeds yet |")
    for key in COST_KEYS:  # the same at every seed: the value, not an interval
        values = sorted(set(selection.reported_values.get(f"eval/{key}", {}).values()))
        if values:
            lines.append(f"| {key.replace('_', ' ')} | {', '.join(f'{v:g}' for v in values)} |")
    return [*lines, ""]


def summary_lines(selections: Sequence[Selection], metrics: Sequence[str]) -> list[str]:
    """With several selections (``--select-per``): one table, a row per group with its chosen row and that row's
    metrics over the report seeds (mean ± t-interval half-width, n) and its cost per image; empty for one."""
    if len(selections) < 2:
        return []
    first = selections[0]
    shown = [m for m in metrics if any(m in s.reported for s in selections)]
    costs = [key for key in COST_KEYS if any(f"eval/{key}" in s.reported_values for s in selections)]
    head = ["group", "chosen", *(f"{display_name(m)} {arrow(m)}" for m in shown), "n",
            *(key.replace("_", " ") for key in costs)]
    lines = [f"## Held-out selection per group: chosen on `{first.axis}` = {', '.join(first.selection_seeds)}, "
             f"reported on `{first.axis}` = {', '.join(first.report_seeds)}", "",
             "Each group's chosen row (lowest/highest mean primary metric over the selection seeds) and its metrics "
             f"over the report seeds only: mean ± {CONFIDENCE:.0%} t-interval half-width. Sections below: the "
             "candidates of each group.", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for selection in selections:
        label = selection.candidates[selection.chosen][0]
        cells = [stats_cell(selection.reported.get(m)).split(" (")[0] for m in shown]
        n = max((selection.reported[m].n for m in shown if m in selection.reported), default=0)
        spent = [", ".join(f"{v:g}" for v in sorted(set(selection.reported_values.get(f"eval/{key}", {}).values())))
                 for key in costs]
        row = [selection.group or "", f"`{label}`", *cells, str(n), *spent]
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |")
    return [*lines, ""]


def selection_json(selection: Selection, sweep_dir: str | Path) -> dict[str, Any]:
    """``selection.json``: what made it, both seed sets, the candidates, the choice and the reported values."""
    def number(value: float | None) -> float | None:
        return None if value is None or not math.isfinite(value) else value

    label, values, stats = selection.candidates[selection.chosen]
    return {
        "made_by": "ddpm-report --select", "sweep_dir": str(sweep_dir), "group": selection.group,
        "metric": selection.metric,
        "mode": selection.mode, "seed_key": selection.axis, "unit_kind": selection.unit_kind,
        "selection_seeds": selection.selection_seeds, "report_seeds": selection.report_seeds,
        "confidence": CONFIDENCE,
        "candidates": [{"row": row, "overrides": overrides, "selection_mean": number(s.mean), "selection_n": s.n}
                       for row, overrides, s in selection.candidates],
        "chosen": {"row": label, "overrides": values, "selection_mean": number(stats.mean)},
        "reported": {metric: {"n": s.n, "mean": number(s.mean), "std": number(s.std), "ci_low": number(s.low),
                              "ci_high": number(s.high), "values": selection.reported_values[metric]}
                     for metric, s in selection.reported.items()},
    }


def selections_json(selections: Sequence[Selection], sweep_dir: str | Path,
                    per: Sequence[str] | str | None = None,
                    comparisons: Sequence[dict[str, Any]] | None = None) -> dict[str, Any]:
    """``selection.json``: ``selection_json`` of the one selection, or with ``per`` every group's under
    ``groups`` (group -> its selection) and the ``comparisons`` of the chosen rows (``compare.comparison_json``)."""
    keys = _seed_list(per)
    if not keys:
        return selection_json(selections[0], sweep_dir)
    return {"made_by": "ddpm-report --select --select-per", "sweep_dir": str(sweep_dir), "per": keys,
            "groups": {s.group: selection_json(s, sweep_dir) for s in selections},
            "comparisons": list(comparisons or ())}
