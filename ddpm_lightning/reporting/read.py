"""Reading a sweep: its job folders, one ``RunRecord`` per job, and the jobs it launches that have no folder yet.

Each job folder (one with a ``.hydra/`` folder) is one record: its overrides (``.hydra/overrides.yaml``), the
``summary.json`` that ``ddpm-train`` writes at the end (status, parameter count, fit time, final metrics), the
end-of-training scores in ``metrics.json``, the ``results.json`` of a ``ddpm-eval`` job (its scores as ``eval/...``),
the ``provenance`` these files record and, for failed runs, the message of ``summary.json`` / ``error.txt``. A job
folder with none of these is still running, or ``incomplete`` when nothing in it has changed for ``stale_after_s``
(killed, out of time). The jobs a sweep launches come from its ``multirun.yaml`` through ``sweeps.expand_sweep``
(Hydra imported only then).
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..artifacts import ERROR_FILE, METRICS_FILE, SUMMARY_FILE
from ..artifacts import RESULTS_FILE as EVAL_RESULTS_FILE  # ddpm-eval

STATUSES = ("completed", "failed", "running", "incomplete")
# the sweeps that ``ddpm-report --add-seeds`` writes into a sweep folder: their jobs are rows of the same report
ADDED_SEEDS_DIR = "added_seeds"
# what an image cost to sample (results.json ``generation``), read as eval/<key>: shown beside a held-out selection
COST_KEYS = ("network_calls_per_image", "classifier_gradients_per_image")
REPORT_SEEDS_DIR = "report_seeds"  # the report seeds of a held-out selection's chosen rows (rerun.plan_report_seeds)
SERIES_FILE = "series.json"  # ddpm-eval ckpts=<run>: one record per checkpoint (``read_series``)


@dataclass
class RunRecord:
    """One job folder of a sweep."""

    folder: Path
    job: int | None
    overrides: list[str]
    status: str
    message: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    num_parameters: int | None = None
    train_seconds: float | None = None
    global_step: int | None = None
    kind: str = "train"  # train (ddpm-train) | eval (ddpm-eval): decides what `seed` is
    provenance: dict[str, Any] | None = None  # what made its numbers (code, machine, precision); None before 2026-12


def override_dict(overrides: Sequence[str]) -> dict[str, str]:
    """``["+train.p_uncond=0.1", "model=adm"]`` -> ``{"train.p_uncond": "0.1", "model": "adm"}``."""
    result = {}
    for item in overrides:
        key, sep, value = str(item).partition("=")
        result[key.lstrip("+~")] = value if sep else ""
    return result


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def read_yaml(path: Path) -> Any:
    """The file's YAML (None when unreadable)."""
    try:
        return yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None


def _floats(values: dict[str, Any]) -> dict[str, float]:
    out = {}
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        out[key] = float(value)
    return out


def _hydra_job(folder: Path) -> dict[str, Any]:
    """The ``hydra.job`` node of the job's ``.hydra/hydra.yaml`` ({} when unreadable)."""
    hydra_cfg = read_yaml(folder / ".hydra" / "hydra.yaml")
    job = hydra_cfg.get("hydra", {}).get("job") if isinstance(hydra_cfg, dict) else None
    return job if isinstance(job, dict) else {}


def _job_number(folder: Path) -> int | None:
    try:
        return int(_hydra_job(folder)["num"])
    except (KeyError, TypeError, ValueError):
        match = re.match(r"(\d+)(_|$)", folder.name)
        return int(match.group(1)) if match else None


def _last_change(folder: Path) -> float:
    latest = folder.stat().st_mtime
    for path in folder.rglob("*"):
        try:
            latest = max(latest, path.stat().st_mtime)
        except OSError:  # written or removed while we look
            continue
    return latest


def read_run(folder: str | Path, stale_after_s: float = 3600.0, now: float | None = None) -> RunRecord:
    """The record of one job folder (see the module docstring for how the status is decided)."""
    folder = Path(folder)
    try:
        overrides = [str(o) for o in (yaml.safe_load((folder / ".hydra" / "overrides.yaml").read_text()) or [])]
    except (OSError, yaml.YAMLError):
        overrides = []
    run = RunRecord(folder=folder, job=_job_number(folder), overrides=overrides, status="running")
    if _hydra_job(folder).get("config_name") == "eval" or (folder / EVAL_RESULTS_FILE).is_file():
        run.kind = "eval"
    summary = _read_json(folder / SUMMARY_FILE)
    error_path = folder / ERROR_FILE
    error_text = error_path.read_text().strip() if error_path.is_file() else None
    if summary is not None:
        run.status = str(summary.get("status", "completed"))
        run.metrics.update(_floats(summary.get("metrics") or {}))
        run.num_parameters = summary.get("num_parameters")
        run.train_seconds = summary.get("train_seconds")
        run.global_step = summary.get("global_step")
        if run.status == "failed":
            run.message = summary.get("error") or summary.get("message") or error_text
    elif error_text is not None:
        run.status, run.message = "failed", error_text
    else:
        idle = (time.time() if now is None else now) - _last_change(folder)
        run.status = "running" if idle < stale_after_s else "incomplete"
        if run.status == "incomplete":
            run.message = f"no summary.json and nothing written for {idle / 60:.0f} min (killed or out of time?)"
    end_scores = _read_json(folder / METRICS_FILE)
    if end_scores:
        run.metrics.update({k: v for k, v in _floats(end_scores).items() if "/" in k})
    eval_results = _read_json(folder / EVAL_RESULTS_FILE)
    if eval_results is not None:
        run.metrics.update({f"eval/{k}": v for k, v in _floats(eval_results.get("metrics") or {}).items()})
        if isinstance(eval_results.get("sampling_seconds"), int | float):  # null: not recorded for every shard
            run.metrics["eval/sampling_seconds"] = float(eval_results["sampling_seconds"])
        generation = eval_results.get("generation") or {}
        run.metrics.update({f"eval/{key}": float(generation[key]) for key in COST_KEYS
                            if isinstance(generation.get(key), int | float) and not isinstance(generation[key], bool)})
        if summary is None and error_text is None:
            run.status, run.message = "completed", None
    for source in (eval_results, summary, end_scores):  # ddpm-eval's own first: it made the eval/ numbers
        if isinstance((source or {}).get("provenance"), dict):
            run.provenance = source["provenance"]
            break
    if run.message:
        run.message = " ".join(str(run.message).split())  # one line
    return run


def read_series(folder: Path, stale_after_s: float = 3600.0) -> list[RunRecord]:
    """The records of a job folder: one per checkpoint of a ``ddpm-eval ckpts=`` series (``series.json``: its
    ``step<N>/`` folders in step order, each with the job's overrides plus ``ckpt_step=N`` and ``global_step`` N),
    else the folder's own ``read_run``."""
    job = read_run(folder, stale_after_s)
    series = _read_json(folder / SERIES_FILE)
    if series is None:
        return [job]
    records = []
    for item in series.get("checkpoints") or []:
        run = read_run(folder / str(item["folder"]), stale_after_s)
        run.job, run.kind, run.global_step = job.job, "eval", int(item["step"])
        run.overrides = [*job.overrides, f"ckpt_step={item['step']}"]
        run.provenance = run.provenance or job.provenance
        records.append(run)
    return records or [job]


def find_job_folders(sweep_dir: str | Path) -> list[Path]:
    """Folders under ``sweep_dir`` that Hydra ran a job in (``sweep_dir`` itself for a single run).

    Symlinked folders are followed (each real folder once, so a link loop ends), which makes a folder of links to
    job folders of several sweeps one report: e.g. arms added later beside the arm they are compared with."""
    sweep_dir = Path(sweep_dir)
    found, seen = [], set()
    for root, dirs, _ in os.walk(sweep_dir, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        marker = Path(root) / ".hydra"
        if (marker / "overrides.yaml").is_file() or (marker / "config.yaml").is_file():
            found.append(Path(root))
        dirs[:] = [d for d in dirs if not d.startswith(".")]  # .hydra/, .submitit/ and other hidden folders
    return sorted(found)


def collect_runs(sweep_dir: str | Path, stale_after_s: float = 3600.0) -> list[RunRecord]:
    """Every job of a multirun folder (or the one run of a run folder), in job order; the jobs of the sweeps under
    its ``added_seeds/`` folder (``ddpm-report --add-seeds``) after the others, so the rows keep their order."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise FileNotFoundError(f"{sweep_dir} is not a folder; give a multirun folder, e.g. multirun/<task>/<time>")
    folders = find_job_folders(sweep_dir)
    if not folders:
        raise FileNotFoundError(f"no job folders (with a .hydra/ folder) under {sweep_dir}; "
                                "give the folder of a `ddpm-train -m` sweep (hydra.sweep.dir)")
    runs = [run for folder in folders for run in read_series(folder, stale_after_s)]
    _fill_unset_overrides(runs)
    check_one_sweep(runs, sweep_dir)
    added = {ADDED_SEEDS_DIR, REPORT_SEEDS_DIR}
    return sorted(runs, key=lambda r: (bool(added & set(r.folder.relative_to(sweep_dir).parts)), r.job is None,
                                       r.job if r.job is not None else 0, str(r.folder)))


def check_one_sweep(runs: Sequence[RunRecord], sweep_dir: Path) -> None:
    """ValueError when the job folders under ``sweep_dir`` are not the jobs of one sweep (arms linked in from other
    sweeps of the same task are): jobs of two commands (``ddpm-train`` and ``ddpm-eval``), of two tasks
    (experiments), or two folders that ran the same job (a parent of two sweeps: each seed would count twice)."""
    def first(key) -> dict[Any, Path]:  # each known value (a job folder that records it) and its first folder
        found: dict[Any, Path] = {}
        for run in runs:
            if (value := key(run)) is not None:
                found.setdefault(value, run.folder)
        return found

    def command(run: RunRecord) -> str | None:
        name = _hydra_job(run.folder).get("config_name")
        return f"ddpm-{name}" if name else None

    def task(run: RunRecord) -> Any:
        config = read_yaml(run.folder / ".hydra" / "config.yaml")
        return config.get("task_name") if isinstance(config, dict) else None

    advice = "report each sweep folder on its own, or link the jobs to compare into one folder"
    for what, found in (("commands", first(command)), ("tasks", first(task))):
        if len(found) > 1:
            shown = " and ".join(f"{name} ({folder})" for name, folder in found.items())
            raise ValueError(f"{sweep_dir} holds the jobs of more than one sweep: two {what}, {shown}; {advice}")
    seen: dict[tuple[str, ...], Path] = {}
    for run in runs:
        job = tuple(sorted(run.overrides))
        if job in seen and seen[job] != run.folder:
            raise ValueError(f"{sweep_dir} holds the jobs of more than one sweep: {seen[job]} and {run.folder} ran "
                             f"the same job ({' '.join(job) or 'no overrides'}), whose seeds would count twice; "
                             f"{advice}")
        seen[job] = run.folder


def _fill_unset_overrides(runs: Sequence[RunRecord]) -> None:
    """A key that some jobs override and another does not (sweeps merged through links: the earlier arm ran at the
    default) gets that job's composed value from its ``.hydra/config.yaml``, appended to its overrides, so its row
    is labelled ``optim.lr=0.002`` rather than blank. Config groups and keys absent from the config stay unset."""
    keys = list(dict.fromkeys(key for run in runs for key in override_dict(run.overrides)))
    for run in runs:
        unset = [key for key in keys if key not in override_dict(run.overrides)]
        config = read_yaml(run.folder / ".hydra" / "config.yaml") if unset else None
        for key in unset:
            node = config
            for part in key.split("."):
                node = node.get(part) if isinstance(node, dict) else None
            if node is not None and not isinstance(node, (dict, list)):
                value = ("true" if node else "false") if isinstance(node, bool) else str(node)
                run.overrides.append(f"{key}={value}")


def expected_jobs(sweep_dir: str | Path) -> list[dict[str, str]] | None:
    """The overrides of every job the sweep launches, in launch order, from its ``multirun.yaml`` (Hydra's basic
    sweeper, expanded by ``sweeps.expand_sweep``: the cartesian product of ``hydra.sweeper.params`` and the command
    line, the command line winning); None for other sweepers (Optuna), without the file, or for a sweep it cannot
    expand (an override Hydra does not parse, ``glob(...)``)."""
    from hydra.errors import HydraException

    from ..sweeps import expand_sweep, is_basic_sweeper

    config = read_yaml(Path(sweep_dir) / "multirun.yaml")
    hydra = config.get("hydra") if isinstance(config, dict) else None
    if not isinstance(hydra, dict):
        return None
    sweeper = hydra.get("sweeper") or {}
    if not is_basic_sweeper(sweeper.get("_target_")):
        return None
    task = (hydra.get("overrides") or {}).get("task") or []
    try:
        jobs = expand_sweep(sweeper.get("params") or {}, task)
    except HydraException:
        return None
    return [override_dict(job) for job in jobs]


def missing_jobs(runs: Sequence[RunRecord], expected: Sequence[dict[str, str]] | None) -> list[dict[str, str]]:
    """The expected jobs that no job folder ran (interrupted before they started)."""
    seen = [override_dict(run.overrides) for run in runs]
    return [job for job in expected or [] if not any(all(v.get(k) == x for k, x in job.items()) for v in seen)]
