"""Sweep reports: a Hydra multirun folder becomes one table (markdown + CSV) and a bar plot, like ADM's Table 1.

Each job folder (one with a ``.hydra/`` folder) is one row: its overrides (``.hydra/overrides.yaml``), the
``summary.json`` that ``ddpm-train`` writes at the end (status, parameter count, fit time, final metrics),
the end-of-training scores in ``metrics.json``, the ``results.json`` of a ``ddpm-eval`` job (its scores as
``eval/...``) and, for failed runs, the message of ``summary.json`` / ``error.txt``. A job folder with none
of these is still running, or ``incomplete`` when nothing in it has changed for ``stale_after_s`` (killed, out
of time).

Seeds are an axis, not a row: when a seed override (``SEED_KEYS``: ``seed``, ``sample.seed``,
``callbacks.generative_metrics.seed``) takes several values, ``aggregate`` groups the jobs by their overrides minus
the seed axes and reports per metric the mean, std, n and a 95% t-interval, the paired difference against a
baseline row over the seeds both rows have (common random numbers), a verdict per row and metric (``verdict``) and
the best row by a rule that uses those differences (``Aggregate.best``). ``seed`` of a ``ddpm-train`` job is the
training seed; the other keys, and ``seed`` of a ``ddpm-eval`` job, are sampling seeds. The unit of replication is
the training seed when one varies (sampling seeds are averaged inside it and their spread reported apart), else the
sampling seed. Jobs of the sweep that have no folder yet (from the folder's ``multirun.yaml``) and seeds that failed
or are missing are listed per row. Plain Python: no torch or Lightning; scipy for t quantiles, Hydra's override
parser for the expected jobs, matplotlib (a Figure, no pyplot) only when plotting.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import math
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .artifacts import ERROR_FILE, METRICS_FILE, SUMMARY_FILE, atomic_write, write_text
from .artifacts import RESULTS_FILE as EVAL_RESULTS_FILE  # ddpm-eval

STATUSES = ("completed", "failed", "running", "incomplete")
MODES = ("min", "max")
# the direction of every metric the reports know, by name without the stage prefix and the sample count; a name
# not listed is ranked lower-is-better (losses)
HIGHER_IS_BETTER = ("is_mean", "is_clf_mean", "is", "precision", "recall", "acc", "accuracy", "class_accuracy")
LOWER_IS_BETTER = ("fid", "fid_inf", "sfid", "kid_mean", "vlb_bpd", "nll_bpd", "bpd", "loss")
# the columns of the markdown table, in this order (CSV has every metric)
TABLE_METRICS = ("fid", "fid_inf", "sfid", "is_clf_mean", "is_mean", "precision", "recall", "kid_mean", "kid_std",
                 "class_accuracy", "vlb_bpd", "nll_bpd")
DISPLAY_NAMES = {"fid": "FID", "fid_inf": "FID-inf", "sfid": "sFID", "is_clf_mean": "IS_clf", "is_mean": "IS",
                 "precision": "Prec", "recall": "Rec", "kid_mean": "KID", "kid_std": "KID std", "class_accuracy": "Acc",
                 "vlb_bpd": "NLL bpd", "nll_bpd": "NLL bpd (exact)"}
# spreads of one evaluation, not scores: aggregated and shown, never given a verdict
NO_VERDICT = ("kid_std",)
# overrides that are seeds: a sweep over them replicates rows instead of adding rows
SEED_KEYS = ("seed", "sample.seed", "callbacks.generative_metrics.seed")
# the seed keys that are the training seed in a ddpm-train job (in a ddpm-eval job `seed` is the sampling seed)
TRAINING_SEED_KEYS = ("seed",)
# the verdict rule: a paired difference is inconclusive below VERDICT_SE standard errors, when its CONFIDENCE
# t-interval contains 0, or below VERDICT_REL of the baseline's value (Dufour et al. 2026: FID gaps under ~1.3% are
# within what retraining moves)
VERDICT_SE = 2.0
VERDICT_REL = 0.013
CONFIDENCE = 0.95
VERDICTS = ("better", "worse", "inconclusive")
# a sweep over one of these (ddpm-eval -m experiment=guidance_sweep) also gets the trade-off plot
GUIDANCE_KEYS = ("guidance.scale", "guidance.cfg_scale")
# metric prefixes shown in the table: in-loop / end-of-training scores of ddpm-train, scores of ddpm-eval
TABLE_PREFIXES = ("val/", "eval/")
NOTES = {
    "fid": "FID/KID/Prec/Rec/IS@n: n EMA samples against the cached statistics of the data set's real images "
           "(not comparable with 50k-sample FIDs; small n biases FID upwards).",
    "class_accuracy": "Acc: the share of samples that the clean classifier (trained once per data set by the "
                      "metrics, not the guiding noisy classifier) assigns to the label they were sampled for.",
    "kid_mean": "KID std: the spread of KID over its sample subsets within one evaluation (not over seeds).",
    "vlb_bpd": "NLL bpd = `val/vlb_bpd`: an unbiased single-timestep Monte-Carlo estimate of the variational "
               "bound (prior + T * L_t at one random t per image), in bits/dim, on held-out images with the EMA "
               "weights at the last validation. An upper bound on the NLL, and noisy; the exact bound (full "
               "T-step loop) is `ddpm-eval ckpt=... metrics=[nll]`.",
}


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


@dataclass
class SweepTable:
    """Rows of a sweep in job order, the overrides that vary between them and the ranking metric."""

    sweep_dir: Path
    runs: list[RunRecord]
    varying: list[str]
    common: list[str]
    metric: str | None
    mode: str | None
    best: int | None  # index into runs

    def label(self, run: RunRecord) -> str:
        """The run's varying overrides, e.g. ``model=adm_biggan`` (``job N`` when nothing varies)."""
        values = _override_dict(run.overrides)
        parts = [f"{key}={values[key]}" for key in self.varying if key in values]
        return " ".join(parts) or (f"job {run.job}" if run.job is not None else run.folder.name)


# ---------------------------------------------------------------------------------------------- reading
def _override_dict(overrides: Sequence[str]) -> dict[str, str]:
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


def _read_yaml(path: Path) -> Any:
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
    hydra_cfg = _read_yaml(folder / ".hydra" / "hydra.yaml")
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
        if "sampling_seconds" in eval_results:
            run.metrics["eval/sampling_seconds"] = float(eval_results["sampling_seconds"])
        if summary is None and error_text is None:
            run.status, run.message = "completed", None
    if run.message:
        run.message = " ".join(str(run.message).split())  # one line
    return run


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
    """Every job of a multirun folder (or the one run of a run folder), in job order."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise FileNotFoundError(f"{sweep_dir} is not a folder; give a multirun folder, e.g. multirun/<task>/<time>")
    folders = find_job_folders(sweep_dir)
    if not folders:
        raise FileNotFoundError(f"no job folders (with a .hydra/ folder) under {sweep_dir}; "
                                "give the folder of a `ddpm-train -m` sweep (hydra.sweep.dir)")
    runs = [read_run(folder, stale_after_s) for folder in folders]
    _fill_unset_overrides(runs)
    return sorted(runs, key=lambda r: (r.job is None, r.job if r.job is not None else 0, str(r.folder)))


def _fill_unset_overrides(runs: Sequence[RunRecord]) -> None:
    """A key that some jobs override and another does not (sweeps merged through links: the earlier arm ran at the
    default) gets that job's composed value from its ``.hydra/config.yaml``, appended to its overrides, so its row
    is labelled ``optim.lr=0.002`` rather than blank. Config groups and keys absent from the config stay unset."""
    keys = list(dict.fromkeys(key for run in runs for key in _override_dict(run.overrides)))
    for run in runs:
        unset = [key for key in keys if key not in _override_dict(run.overrides)]
        config = _read_yaml(run.folder / ".hydra" / "config.yaml") if unset else None
        for key in unset:
            node = config
            for part in key.split("."):
                node = node.get(part) if isinstance(node, dict) else None
            if node is not None and not isinstance(node, (dict, list)):
                value = ("true" if node else "false") if isinstance(node, bool) else str(node)
                run.overrides.append(f"{key}={value}")


# ---------------------------------------------------------------------------------------------- ranking
def base_name(metric: str) -> str:
    """``val/fid@200`` -> ``fid``; ``val/vlb_bpd`` -> ``vlb_bpd``."""
    return metric.rsplit("/", 1)[-1].split("@", 1)[0]


def metric_mode(metric: str) -> str:
    """``max`` for ``HIGHER_IS_BETTER`` names (IS / precision / recall / accuracy), ``min`` for
    ``LOWER_IS_BETTER`` ones (FID, KID, bits/dim) and for any other name (losses)."""
    return "max" if base_name(metric) in HIGHER_IS_BETTER else "min"


def _arrow(metric: str) -> str:
    return "↑" if metric_mode(metric) == "max" else "↓"


def _finite(value: float | None) -> bool:
    return value is not None and not math.isnan(value) and not math.isinf(value)


def default_metric(runs: Sequence[RunRecord]) -> str | None:
    """The ``val/fid@n`` with the largest n any run has, else ``eval/fid@n`` (ddpm-eval sweeps), else
    ``val/vlb_bpd``, else None."""
    keys = {k for run in runs for k, v in run.metrics.items() if _finite(v)}
    for prefix in TABLE_PREFIXES:
        fids = sorted((k for k in keys if base_name(k) == "fid" and k.startswith(prefix)), key=_sample_count)
        if fids:
            return fids[-1]
    return "val/vlb_bpd" if "val/vlb_bpd" in keys else None


def _sample_count(metric: str) -> float:
    count = metric.rsplit("@", 1)[-1] if "@" in metric else "0"
    scale = {"k": 1e3, "M": 1e6}.get(count[-1:], 1.0)
    try:
        return float(count.rstrip("kM")) * scale
    except ValueError:
        return 0.0


def build_table(runs: Sequence[RunRecord], sweep_dir: str | Path, metric: str | None = None,
                mode: str | None = None) -> SweepTable:
    """Rank ``runs`` by ``metric`` (default: ``default_metric``) in direction ``mode`` (default: by name)."""
    runs = list(runs)
    if mode is not None and mode not in MODES:
        raise ValueError(f"mode={mode!r}; allowed: {', '.join(MODES)}")
    if metric is not None and not any(metric in run.metrics for run in runs):
        available = sorted({k for run in runs for k in run.metrics})
        if any(run.status == "completed" for run in runs):
            raise ValueError(f"no run has the metric {metric!r}; available: {', '.join(available) or 'none'}")
    metric = metric or default_metric(runs)
    mode = mode or (metric_mode(metric) if metric else None)
    best = None
    if metric is not None:
        scored = [(run.metrics[metric], i) for i, run in enumerate(runs)
                  if run.status == "completed" and _finite(run.metrics.get(metric))]
        if scored:
            best = (min(scored) if mode == "min" else max(scored, key=lambda s: (s[0], -s[1])))[1]
    per_run = [_override_dict(run.overrides) for run in runs]
    keys = list(dict.fromkeys(key for values in per_run for key in values))
    varying = [k for k in keys if len({values.get(k) for values in per_run}) > 1]
    common = [f"{k}={per_run[0][k]}" for k in keys if k not in varying]
    return SweepTable(sweep_dir=Path(sweep_dir), runs=runs, varying=varying, common=common, metric=metric,
                      mode=mode, best=best)


# ---------------------------------------------------------------------------------------------- seeds
@dataclass
class Stats:
    """``n`` values: their mean, std (n - 1 in the denominator) and two-sided t-interval; no std/interval for n < 2."""

    n: int
    mean: float | None = None
    std: float | None = None
    low: float | None = None
    high: float | None = None

    @property
    def se(self) -> float | None:
        """The standard error of the mean."""
        return None if self.std is None else self.std / math.sqrt(self.n)

    @property
    def half_width(self) -> float | None:
        return None if self.low is None or self.high is None else (self.high - self.low) / 2


def summarize(values: Sequence[float], confidence: float = CONFIDENCE) -> Stats:
    """Mean, std, n and the ``confidence`` t-interval (Student's t with n - 1 degrees of freedom) of the finite
    ``values``."""
    values = [float(v) for v in values if _finite(v)]
    n = len(values)
    if n == 0:
        return Stats(0)
    mean = math.fsum(values) / n
    if n == 1:
        return Stats(1, mean)
    from scipy import stats

    std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * std / math.sqrt(n)
    return Stats(n, mean, std, mean - half, mean + half)


def verdict(delta: float | None, se: float | None, baseline: float | None, mode: str,
            se_factor: float = VERDICT_SE, rel: float = VERDICT_REL, pairs: int | None = None) -> str:
    """``better`` / ``worse`` / ``inconclusive`` for a paired difference ``delta`` = row - baseline with standard
    error ``se``: inconclusive when ``|delta| < se_factor * se``, when ``|delta| < rel * |baseline|``, when there
    is no standard error (fewer than 2 pairs) or no difference, and, given the number of ``pairs``, when the
    difference's ``CONFIDENCE`` t-interval contains 0 (with 3 pairs that is 4.3 standard errors: 2 alone would
    decide differences that the printed interval does not exclude from 0); else better or worse by ``mode`` (min:
    lower is better). Ties at a threshold are decided (not inconclusive)."""
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}; allowed: {', '.join(MODES)}")
    if not _finite(delta) or delta == 0 or not _finite(se) or abs(delta) < se_factor * se:
        return "inconclusive"
    if pairs is not None:
        if pairs < 2:
            return "inconclusive"
        from scipy import stats

        if abs(delta) < float(stats.t.ppf(0.5 + CONFIDENCE / 2, pairs - 1)) * se:
            return "inconclusive"
    if _finite(baseline) and abs(delta) < rel * abs(baseline):
        return "inconclusive"
    return "better" if (delta < 0) == (mode == "min") else "worse"


@dataclass
class Paired:
    """A row against a reference row over the seeds both have: the differences row - reference, the reference's
    mean over those seeds and the verdict."""

    diff: Stats
    reference: float | None
    verdict: str


@dataclass
class RowGroup:
    """One row of the aggregated table: the jobs that differ only in their seeds."""

    label: str
    values: dict[str, str]  # its non-seed overrides that vary between rows
    runs: list[RunRecord]
    expected: list[str]  # seed labels (e.g. "seed=1") the sweep has or launches for this row
    units: dict[str, dict[str, float]] = field(default_factory=dict)  # metric -> seed label -> value
    stats: dict[str, Stats] = field(default_factory=dict)
    within_std: dict[str, float] = field(default_factory=dict)  # metric -> pooled std over the inner seeds
    vs_baseline: dict[str, Paired] = field(default_factory=dict)
    vs_best: Paired | None = None  # on the primary metric

    def seed_status(self, unit_label) -> dict[str, str]:
        """Seed label -> status for every expected seed (``missing`` when it has no job folder)."""
        status = dict.fromkeys(self.expected, "missing")
        for run in self.runs:
            status[unit_label(run)] = run.status
        return status


@dataclass
class Aggregate:
    """A sweep with seed axes, one ``RowGroup`` per setting."""

    groups: list[RowGroup]
    seed_axes: list[str]  # the seed keys that vary
    unit_axes: list[str]  # the seeds the intervals are over (the training seed when it varies)
    inner_axes: list[str]  # sampling seeds averaged inside a training seed
    unit_kind: str  # "training seed" | "sampling seed"
    metric: str | None
    mode: str | None
    baseline: int
    best: int | None
    tied: list[int]
    metrics: list[str]

    def seed_label(self, run_or_values: RunRecord | dict[str, str]) -> str:
        values = (_override_dict(run_or_values.overrides) if isinstance(run_or_values, RunRecord)
                  else run_or_values)
        return " ".join(f"{k}={values.get(k, '')}" for k in self.seed_axes)


def expected_jobs(sweep_dir: str | Path) -> list[dict[str, str]] | None:
    """The overrides of every job the sweep launches, in launch order, from its ``multirun.yaml`` (Hydra's basic
    sweeper: the cartesian product of ``hydra.sweeper.params`` and the command line, the command line winning);
    None for other sweepers (Optuna) or without the file."""
    config = _read_yaml(Path(sweep_dir) / "multirun.yaml")
    hydra = config.get("hydra") if isinstance(config, dict) else None
    if not isinstance(hydra, dict):
        return None
    sweeper = hydra.get("sweeper") or {}
    if not str(sweeper.get("_target_", "")).endswith("BasicSweeper"):
        return None
    params = sweeper.get("params") or {}
    task = (hydra.get("overrides") or {}).get("task") or []
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()] + list(task))
    except HydraException:
        return None
    choices: dict[str, list[str]] = {}
    for override in parsed:
        key = override.get_key_element()
        values = (list(override.sweep_string_iterator()) if override.is_sweep_override()
                  else [override.get_value_element_as_str()])
        choices[key] = [f"{key}={value}" for value in values]  # a repeated key keeps its first position
    return [_override_dict(combo) for combo in itertools.product(*choices.values())]


def missing_jobs(runs: Sequence[RunRecord], expected: Sequence[dict[str, str]] | None) -> list[dict[str, str]]:
    """The expected jobs that no job folder ran (interrupted before they started)."""
    seen = [_override_dict(run.overrides) for run in runs]
    return [job for job in expected or [] if not any(all(v.get(k) == x for k, x in job.items()) for v in seen)]


def aggregate(table: SweepTable, seed_keys: Sequence[str] = SEED_KEYS, baseline: str | None = None,
              expected: Sequence[dict[str, str]] | None = None) -> Aggregate | None:
    """Group ``table``'s runs by their overrides minus the seed axes and compare every row with ``baseline`` (a
    row label such as ``model=ddpm_base`` or some of its overrides; default: the first row). None when no seed key
    takes two values (the sweep reports run by run)."""
    jobs = [_override_dict(run.overrides) for run in table.runs] + list(expected or [])
    seed_axes = [k for k in dict.fromkeys(k for values in jobs for k in values)
                 if k in seed_keys and len({values.get(k) for values in jobs}) > 1]
    if not seed_axes:
        return None
    training = any(run.kind == "train" for run in table.runs) or not table.runs
    train_axes = [k for k in seed_axes if training and k in TRAINING_SEED_KEYS]
    unit_axes = train_axes or seed_axes
    inner_axes = [k for k in seed_axes if k not in unit_axes]
    keys = list(dict.fromkeys(k for values in jobs for k in values if k not in seed_axes))
    varying = [k for k in keys if len({values.get(k) for values in jobs}) > 1]

    def row_values(values: dict[str, str]) -> dict[str, str]:
        return {k: values.get(k, "") for k in varying}

    def unit_of(values: dict[str, str]) -> str:
        return " ".join(f"{k}={values.get(k, '')}" for k in unit_axes)

    groups: dict[tuple, RowGroup] = {}
    for values in jobs:
        row = row_values(values)
        group = groups.setdefault(tuple(row.items()), RowGroup(
            label=" ".join(f"{k}={v}" for k, v in row.items()) or "all", values=row, runs=[], expected=[]))
        seeds = " ".join(f"{k}={values.get(k, '')}" for k in seed_axes)
        if seeds not in group.expected:
            group.expected.append(seeds)
    for run in table.runs:
        groups[tuple(row_values(_override_dict(run.overrides)).items())].runs.append(run)
    rows = list(groups.values())

    metrics = sorted({k for run in table.runs for k in run.metrics})
    for group in rows:
        for metric in metrics:
            per_unit: dict[str, list[float]] = {}
            for run in group.runs:
                value = run.metrics.get(metric)
                if run.status == "completed" and _finite(value):
                    per_unit.setdefault(unit_of(_override_dict(run.overrides)), []).append(value)
            if not per_unit:
                continue
            group.units[metric] = {u: math.fsum(v) / len(v) for u, v in per_unit.items()}
            group.stats[metric] = summarize(list(group.units[metric].values()))
            dof = sum(len(v) - 1 for v in per_unit.values())
            if inner_axes and dof > 0:
                squares = math.fsum((x - group.units[metric][u]) ** 2 for u, v in per_unit.items() for x in v)
                group.within_std[metric] = math.sqrt(squares / dof)

    base = _find_row(rows, baseline)
    mode = table.mode or (metric_mode(table.metric) if table.metric else None)
    for group in rows:
        for metric in metrics:
            if metric in group.units and metric in rows[base].units:
                group.vs_baseline[metric] = _paired(group, rows[base], metric,
                                                    mode if metric == table.metric else None)
    best, tied = None, []
    scored = [(g.stats[table.metric].mean, i) for i, g in enumerate(rows) if table.metric in g.stats]
    if scored and mode is not None:
        best = (min(scored) if mode == "min" else max(scored, key=lambda s: (s[0], -s[1])))[1]
        for i, group in enumerate(rows):
            if i != best and table.metric in group.stats:
                group.vs_best = _paired(group, rows[best], table.metric, mode)
                if group.vs_best.verdict == "inconclusive":
                    tied.append(i)
    return Aggregate(groups=rows, seed_axes=seed_axes, unit_axes=unit_axes, inner_axes=inner_axes,
                     unit_kind="training seed" if train_axes else "sampling seed", metric=table.metric, mode=mode,
                     baseline=base, best=best, tied=tied, metrics=metrics)


def _find_row(rows: Sequence[RowGroup], wanted: str | None) -> int:
    if wanted is None:
        return 0
    wanted_values = _override_dict(wanted.split())
    for i, group in enumerate(rows):
        if wanted == group.label or (wanted_values and all(group.values.get(k) == v for k, v in wanted_values.items())):
            return i
    if len(rows[0].values) == 1:  # one varying key: its bare value also names the row
        matches = [i for i, g in enumerate(rows) if next(iter(g.values.values())) == wanted]
        if matches:
            return matches[0]
    raise ValueError(f"baseline {wanted!r} is no row of this sweep; rows: " + ", ".join(g.label for g in rows))


def _paired(group: RowGroup, reference: RowGroup, metric: str, mode: str | None = None) -> Paired:
    common = [u for u in group.units[metric] if u in reference.units[metric]]
    diff = summarize([group.units[metric][u] - reference.units[metric][u] for u in common])
    ref = math.fsum(reference.units[metric][u] for u in common) / len(common) if common else None
    return Paired(diff=diff, reference=ref,
                  verdict=verdict(diff.mean, diff.se, ref, mode or metric_mode(metric), pairs=diff.n))


def verdict_rule(aggregate: Aggregate) -> str:
    """The verdict rule as implemented (printed under the tables)."""
    return (f"Verdict per row and metric, from the paired differences row - baseline over the {aggregate.unit_kind}s "
            f"both rows completed (common random numbers): **inconclusive** when |mean difference| < "
            f"{VERDICT_SE:g} standard errors of the paired difference (std / sqrt(pairs)), or when its "
            f"{CONFIDENCE:.0%} t-interval contains 0 (the stricter of the two below ~60 pairs: 4.3 standard errors "
            f"with 3), or < {VERDICT_REL:.1%} of "
            "the baseline's mean over those seeds (for every metric; for FID the gap that retraining alone moves, "
            "Dufour et al. 2026), or with fewer than 2 pairs (no standard error); otherwise **better** or "
            "**worse** in the metric's direction. A difference exactly at a threshold is decided. Intervals: "
            f"{CONFIDENCE:.0%} Student-t, mean ± t({0.5 + CONFIDENCE / 2:g}, n-1) · std / sqrt(n). ↓: lower is better, "
            "↑: higher is better.")


def best_rule(aggregate: Aggregate) -> str:
    """The best-row rule as implemented (printed under the tables)."""
    better = "lowest" if aggregate.mode == "min" else "highest"
    return (f"Best row (★): the {better} mean of `{aggregate.metric}` over its {aggregate.unit_kind}s. Rows marked "
            "≈ are tied with it: the verdict rule above, applied to their paired difference against the best row "
            "(its mean over the shared seeds as the reference), finds no difference; the order among ★ and ≈ rows "
            "is not established. Other metrics get verdicts but do not choose the best row (`--metric` does).")


# ---------------------------------------------------------------------------------------------- writing
def metric_columns(table: SweepTable) -> list[str]:
    """The metrics shown in the markdown table: the ranking metric and the sample-quality / NLL ones."""
    keys = {k for run in table.runs for k in run.metrics if k.startswith(TABLE_PREFIXES)}
    order = {name: i for i, name in enumerate(TABLE_METRICS)}
    shown = sorted((k for k in keys if base_name(k) in order), key=lambda k: (order[base_name(k)], k))
    if table.metric and table.metric not in shown:
        shown.insert(0, table.metric)
    return shown


def display_name(metric: str) -> str:
    name = DISPLAY_NAMES.get(base_name(metric))
    if name is None:
        return metric
    return f"{name}@{metric.rsplit('@', 1)[1]}" if "@" in metric else name


def _fmt(value: float | None) -> str:
    if value is None:
        return ""
    if not _finite(value):
        return str(value)
    if value != 0 and abs(value) < 0.01:
        return f"{value:.3g}"
    decimals = 3 if abs(value) < 10 else 2 if abs(value) < 100 else 1 if abs(value) < 1000 else 0
    return f"{value:.{decimals}f}"


def _params(n: Any) -> str:
    return f"{n / 1e6:.2f}M" if isinstance(n, int | float) else ""


def _escape(text: str) -> str:
    return text.replace("|", "\\|")


def _status(table: SweepTable, index: int, best: int | None) -> str:
    run = table.runs[index]
    status = {"completed": "done"}.get(run.status, run.status)
    if index == best:
        status += " ★ best"
    if run.message:
        status += f": {run.message}"
    return _escape(status)


def _signed(value: float | None, decimals: int | None = None) -> str:
    text = _fmt(value) if decimals is None or not _finite(value) else f"{value:.{decimals}f}"
    return f"+{text}" if _finite(value) and value > 0 else text


def _decimals(half_width: float | None) -> int | None:
    """Decimals that show an interval's half-width to two significant digits (None: no interval or width 0)."""
    if not _finite(half_width) or half_width <= 0:
        return None
    return min(max(0, 1 - math.floor(math.log10(half_width))), 8)


def _fmt_with(value: float | None, decimals: int | None) -> str:
    return _fmt(value) if decimals is None or not _finite(value) else f"{value:.{decimals}f}"


def _stats_cell(stats: Stats | None, within: float | None = None) -> str:
    if stats is None or stats.n == 0:
        return ""
    if stats.n == 1:
        text, spread = _fmt(stats.mean), ["n=1"]
    else:
        places = _decimals(stats.half_width)
        text = f"{_fmt_with(stats.mean, places)} ± {_fmt_with(stats.half_width, places)}"
        spread = [f"sd {_fmt_with(stats.std, places)}"]
    if within is not None:
        spread.append(f"sampling sd {_fmt(within)}")
    return f"{text} ({'; '.join(spread)})"


def _paired_cell(paired: Paired | None) -> str:
    if paired is None or paired.diff.n == 0:
        return "no shared seeds"
    if paired.diff.n == 1:
        return f"{_signed(paired.diff.mean)} (1 pair: no interval) {paired.verdict}"
    places = _decimals(paired.diff.half_width)
    text = (f"{_signed(paired.diff.mean, places)} [{_signed(paired.diff.low, places)}, "
            f"{_signed(paired.diff.high, places)}]")
    return f"{text} **{paired.verdict}**" if paired.verdict != "inconclusive" else f"{text} inconclusive"


def _runs_cell(aggregate: Aggregate, group: RowGroup) -> str:
    status = group.seed_status(aggregate.seed_label)
    done = sum(s == "completed" for s in status.values())
    others = [f"{seed} {s}" for seed, s in status.items() if s != "completed"]
    return _escape(f"{done}/{len(status)}" + (": " + ", ".join(others) if others else ""))


def _aggregate_lines(table: SweepTable, aggregate: Aggregate) -> list[str]:
    metrics = metric_columns(table)
    keys = list(aggregate.groups[0].values) or ["row"]
    lines = [f"## Rows: mean ± {CONFIDENCE:.0%} t-interval half-width (sd) over {aggregate.unit_kind}s", "",
             "| " + " | ".join([*keys, "seeds done", *(f"{display_name(m)} {_arrow(m)}" for m in metrics)]) + " |",
             "|" + "|".join(["---"] * (len(keys) + 1 + len(metrics))) + "|"]
    for i, group in enumerate(aggregate.groups):
        label = [_escape(v) for v in group.values.values()] or ["all"]
        mark = (" ★ best" if i == aggregate.best else " ≈ tied" if i in aggregate.tied else "") + (
            " (baseline)" if i == aggregate.baseline else "")
        label[-1] += mark
        if i == aggregate.best:
            label = [f"**{cell}**" for cell in label]
        cells = [_stats_cell(group.stats.get(m), group.within_std.get(m)) for m in metrics]
        lines.append("| " + " | ".join([*label, _runs_cell(aggregate, group), *cells]) + " |")
    compared = [m for m in metrics if base_name(m) not in NO_VERDICT]
    base = aggregate.groups[aggregate.baseline]
    lines += ["", f"## Paired differences against the baseline `{base.label}`: row - baseline, mean "
              f"[{CONFIDENCE:.0%} t-interval], verdict", "",
              "| " + " | ".join([*keys, "pairs", *(f"{display_name(m)} {_arrow(m)}" for m in compared)]) + " |",
              "|" + "|".join(["---"] * (len(keys) + 1 + len(compared))) + "|"]
    for i, group in enumerate(aggregate.groups):
        if i == aggregate.baseline:
            continue
        label = [_escape(v) for v in group.values.values()] or ["all"]
        pairs = max((group.vs_baseline[m].diff.n for m in compared if m in group.vs_baseline), default=0)
        lines.append("| " + " | ".join([*label, str(pairs), *(_paired_cell(group.vs_baseline.get(m))
                                                               for m in compared)]) + " |")
    lines += ["", verdict_rule(aggregate), "", best_rule(aggregate) if aggregate.metric else "", ""]
    return lines


def _seed_lines(aggregate: Aggregate) -> list[str]:
    def values(key: str) -> str:
        found = list(dict.fromkeys(_override_dict(g.split())[key] for group in aggregate.groups
                                   for g in group.expected if key in _override_dict(g.split())))
        return ", ".join(found)

    units = " ".join(f"`{k}` = {values(k)}" for k in aggregate.unit_axes)
    lines = [f"Seeds: {units} ({aggregate.unit_kind}): n counts {aggregate.unit_kind}s."]
    if aggregate.inner_axes:
        inner = " ".join(f"`{k}` = {values(k)}" for k in aggregate.inner_axes)
        lines.append(f"Sampling seeds {inner} are averaged within each training seed; their pooled spread is "
                     "shown as `sampling sd`, apart from the training-seed sd.")
    return lines


def to_markdown(table: SweepTable, title: str | None = None, aggregate: Aggregate | None = None,
                missing: Sequence[dict[str, str]] = ()) -> str:
    """The report: a header (counts, common overrides, ranking, notes, jobs not started), with seed axes the
    aggregated rows, their paired differences and the rules, then one table row per job."""
    counts = {s: sum(r.status == s for r in table.runs) for s in (*STATUSES, *(r.status for r in table.runs))}
    metrics = metric_columns(table)
    lines = [f"# {title or 'Sweep report: ' + table.sweep_dir.name}", "",
             f"`{table.sweep_dir}`: {len(table.runs)} runs: "
             + ", ".join(f"{n} {s}" for s, n in counts.items() if n) + "."]
    if missing:
        jobs = [*(_override_dict(run.overrides) for run in table.runs), *missing]
        shown = [k for k in dict.fromkeys(k for job in jobs for k in job) if len({job.get(k) for job in jobs}) > 1]
        listed = "; ".join(" ".join(f"{k}={job.get(k, '')}" for k in shown) for job in missing[:20])
        more = f" and {len(missing) - 20} more" if len(missing) > 20 else ""
        lines.append(f"Partial sweep: {len(missing)} of {len(missing) + len(table.runs)} jobs have no folder yet "
                     f"(not started): {_escape(listed)}{more}.")
    if table.common:
        lines.append("Common overrides: " + " ".join(f"`{o}`" for o in table.common) + ".")
    mark_best = aggregate is None
    if aggregate is not None:
        lines += _seed_lines(aggregate)
        if aggregate.best is not None:
            better = "lower" if aggregate.mode == "min" else "higher"
            tied = ", ".join(f"`{aggregate.groups[i].label}`" for i in aggregate.tied) or "none"
            lines.append(f"Primary metric `{aggregate.metric}` ({better} is better): best row "
                         f"`{aggregate.groups[aggregate.best].label}` ★; tied with it (≈): {tied}.")
        elif table.metric:
            lines.append(f"Primary metric `{table.metric}`: no completed run has it yet.")
    elif table.metric and table.best is not None:
        better = "lower" if table.mode == "min" else "higher"
        lines.append(f"Ranked by `{table.metric}` ({better} is better); best: job {table.runs[table.best].job} "
                     f"(`{table.label(table.runs[table.best])}`), marked ★ (its value in bold).")
    elif table.metric:
        lines.append(f"Ranked by `{table.metric}`: no completed run has it yet.")
    if aggregate is None and table.runs:
        lines.append("n=1: no interval (one seed per row, so differences between rows are not tested); replicate "
                     "with `seed=0,1,2` (ddpm-train) or `sample.seed=0,1,2` (ddpm-eval) for means, intervals and "
                     "verdicts.")
    optuna = _read_yaml(table.sweep_dir / "optimization_results.yaml")
    if isinstance(optuna, dict) and "best_value" in optuna:
        params = " ".join(f"`{k}={v}`" for k, v in (optuna.get("best_params") or {}).items())
        lines.append(f"Optuna: best value {optuna['best_value']} with {params}.")
    notes = [NOTES[key] for key in ("fid", "kid_mean", "class_accuracy", "vlb_bpd")
             if any(base_name(m) == key for m in metrics)]
    notes.append("params: trainable parameters of the network (the EMA copy not counted); fit min: wall time of "
                 "`trainer.fit` (training, validation and the end-of-training sampling and scoring).")
    lines += ["", *(f"- {note}" for note in notes), ""]
    if aggregate is not None:
        lines += _aggregate_lines(table, aggregate)
        lines += ["## Runs (one per job and seed)", ""]
    best = table.best if mark_best else None
    head = ["job", *(table.varying or ["run"]), "status", "params", "steps", "fit min", *map(display_name, metrics)]
    lines += ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * len(head)) + "|"]
    for i, run in enumerate(table.runs):
        values = _override_dict(run.overrides)
        label = [_escape(values.get(k, "")) for k in table.varying] or [_escape(table.label(run))]
        cells = []
        for metric in metrics:
            text = _fmt(run.metrics.get(metric))
            cells.append(f"**{text}**" if i == best and metric == table.metric and text else text)
        minutes = "" if run.train_seconds is None else f"{run.train_seconds / 60:.1f}"
        row = [str(run.job if run.job is not None else ""), *label, _status(table, i, best),
               _params(run.num_parameters), "" if run.global_step is None else str(run.global_step), minutes, *cells]
        if i == best:
            row[1:1 + len(label)] = [f"**{cell}**" for cell in row[1:1 + len(label)]]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def _save_figure(fig, path: str | Path) -> Path:
    """``fig`` at ``path`` (its suffix gives the format), written atomically."""
    path = Path(path)
    return atomic_write(path, lambda handle: fig.savefig(handle, dpi=120, format=path.suffix.lstrip(".") or "png"))


def write_csv(table: SweepTable, path: str | Path, aggregate: Aggregate | None = None) -> Path:
    """Every run (every per-seed value) with every scalar metric (one column each), its overrides, status and
    row (its overrides minus the seeds); ``best`` is 1 for the best run, or with seed axes for the runs of the best
    row."""
    path = Path(path)
    metrics = sorted({k for run in table.runs for k in run.metrics})
    columns = ["job", "label", "row", *table.varying, "kind", "status", "best", "message", "num_parameters",
               "train_seconds", "global_step", *metrics, "overrides", "folder"]
    row_of = {id(run): group for group in (aggregate.groups if aggregate else []) for run in group.runs}
    best_row = aggregate.groups[aggregate.best] if aggregate and aggregate.best is not None else None
    with io.StringIO(newline="") as handle:  # csv's \r\n line ends kept as they are
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for i, run in enumerate(table.runs):
            values = _override_dict(run.overrides)
            group = row_of.get(id(run))
            best = group is best_row if aggregate else i == table.best
            writer.writerow({"job": run.job, "label": table.label(run), "row": group.label if group else "",
                             **{k: values.get(k, "") for k in table.varying}, "kind": run.kind,
                             "status": run.status, "best": int(best and run.status == "completed"),
                             "message": run.message or "", "num_parameters": run.num_parameters,
                             "train_seconds": run.train_seconds, "global_step": run.global_step,
                             **{k: run.metrics.get(k, "") for k in metrics},
                             "overrides": " ".join(run.overrides), "folder": str(run.folder)})
        return write_text(path, handle.getvalue())


SUMMARY_COLUMNS = ("row", "metric", "mode", "n", "mean", "std", "ci_low", "ci_high", "sampling_std", "seeds_done",
                   "seeds_expected", "baseline", "pairs", "diff_mean", "diff_std", "diff_se", "diff_ci_low",
                   "diff_ci_high", "verdict", "best", "tied_with_best")


def write_summary_csv(aggregate: Aggregate, path: str | Path) -> Path:
    """One line per row and metric: the statistics over seeds, the paired difference against the baseline and its
    verdict (empty for the baseline itself and for metrics without verdicts)."""
    path = Path(path)
    with io.StringIO(newline="") as handle:  # csv's \r\n line ends kept as they are
        writer = csv.DictWriter(handle, fieldnames=SUMMARY_COLUMNS)
        writer.writeheader()
        for i, group in enumerate(aggregate.groups):
            status = group.seed_status(aggregate.seed_label)
            for metric in aggregate.metrics:
                stats = group.stats.get(metric)
                if stats is None:
                    continue
                paired = group.vs_baseline.get(metric) if i != aggregate.baseline else None
                judged = paired is not None and base_name(metric) not in NO_VERDICT
                writer.writerow({
                    "row": group.label, "metric": metric, "mode": metric_mode(metric), "n": stats.n,
                    "mean": stats.mean, "std": stats.std, "ci_low": stats.low, "ci_high": stats.high,
                    "sampling_std": group.within_std.get(metric),
                    "seeds_done": sum(s == "completed" for s in status.values()), "seeds_expected": len(status),
                    "baseline": int(i == aggregate.baseline), "pairs": paired.diff.n if paired else None,
                    "diff_mean": paired.diff.mean if paired else None, "diff_std": paired.diff.std if paired else None,
                    "diff_se": paired.diff.se if paired else None, "diff_ci_low": paired.diff.low if paired else None,
                    "diff_ci_high": paired.diff.high if paired else None,
                    "verdict": paired.verdict if judged else "",
                    "best": int(i == aggregate.best and metric == aggregate.metric),
                    "tied_with_best": int(i in aggregate.tied and metric == aggregate.metric)})
        return write_text(path, handle.getvalue())


def plot(table: SweepTable, path: str | Path, metrics: Sequence[str] | None = None) -> Path:
    """Horizontal bars per run, one panel per metric (default: the ranking metric and the NLL estimate); the
    best run in a second colour, runs without a value labelled with their status."""
    from matplotlib.figure import Figure  # not pyplot: no GUI backend to choose, no global figure to close

    if metrics is None:
        metrics = [m for m in (table.metric, "val/vlb_bpd") if m]
        metrics = [m for i, m in enumerate(metrics) if m not in metrics[:i]
                   and any(_finite(r.metrics.get(m)) for r in table.runs)]
    labels = [f"{run.job}: {table.label(run)}" if run.job is not None else table.label(run) for run in table.runs]
    height = 1.0 + 0.35 * len(table.runs)
    fig = Figure(figsize=(4.5 * max(len(metrics), 1) + 2.5, height))
    axes = fig.subplots(1, max(len(metrics), 1), sharey=True, squeeze=False)
    positions = list(range(len(table.runs)))[::-1]  # first job on top
    for ax, metric in zip(axes[0], metrics or [None], strict=False):
        values = [run.metrics.get(metric) if metric else None for run in table.runs]
        finite = [v for v in values if _finite(v)]
        colors = ["tab:orange" if i == table.best and metric == table.metric else "tab:blue"
                  for i in range(len(values))]
        ax.barh(positions, [v if _finite(v) else 0.0 for v in values], color=colors)
        for pos, value, run in zip(positions, values, table.runs, strict=True):
            text = _fmt(value) if _finite(value) else (run.status if run.status != "completed" else "n/a")
            ax.text(value if _finite(value) else 0.0, pos, f" {text}", va="center", fontsize=8)
        if finite:
            ax.set_xlim(0, max(finite) * 1.25 if max(finite) > 0 else 1.0)
        title = display_name(metric) if metric else "no metric yet"
        if metric:
            title += f" ({'lower' if metric_mode(metric) == 'min' else 'higher'} is better)"
        ax.set_title(title, fontsize=10)
        ax.grid(axis="x", alpha=0.3)
    axes[0][0].set_yticks(positions)
    axes[0][0].set_yticklabels(labels, fontsize=8)
    fig.suptitle(table.sweep_dir.name, fontsize=10)
    fig.tight_layout()
    return _save_figure(fig, path)


def plot_rows(aggregate: Aggregate, path: str | Path, title: str = "", metrics: Sequence[str] | None = None) -> Path:
    """One panel per metric (default: the primary one and the NLL estimate): a bar per row at its mean with its
    t-interval as error bar (none for n=1), a dot per seed; the best row in a second colour."""
    from matplotlib.figure import Figure  # not pyplot: no GUI backend to choose, no global figure to close

    if metrics is None:
        metrics = [m for m in dict.fromkeys((aggregate.metric, "val/vlb_bpd"))
                   if m and any(m in g.stats for g in aggregate.groups)]
    groups = aggregate.groups
    labels = [(f"{g.label} (n={g.stats[aggregate.metric].n})" if aggregate.metric in g.stats else g.label)
              + (" ★" if i == aggregate.best else " ≈" if i in aggregate.tied else "") for i, g in enumerate(groups)]
    fig = Figure(figsize=(4.5 * max(len(metrics), 1) + 3, 1.0 + 0.4 * len(groups)))
    axes = fig.subplots(1, max(len(metrics), 1), sharey=True, squeeze=False)
    positions = list(range(len(groups)))[::-1]  # first row on top
    for ax, metric in zip(axes[0], metrics or [None], strict=False):
        for pos, i, group in zip(positions, range(len(groups)), groups, strict=True):
            stats = group.stats.get(metric) if metric else None
            if stats is None or stats.n == 0:
                ax.text(0.0, pos, " no value", va="center", fontsize=8)
                continue
            error = None if stats.half_width is None else [[stats.half_width], [stats.half_width]]
            color = "tab:orange" if i == aggregate.best and metric == aggregate.metric else "tab:blue"
            ax.barh([pos], [stats.mean], xerr=error, color=color, alpha=0.6, capsize=4)
            seeds = list(group.units[metric].values())
            ax.plot(seeds, [pos] * len(seeds), "k.", markersize=5)
        if metric:
            ax.set_title(f"{display_name(metric)} ({'lower' if metric_mode(metric) == 'min' else 'higher'} is "
                         f"better), mean ± {CONFIDENCE:.0%} CI", fontsize=9)
        ax.grid(axis="x", alpha=0.3)
    axes[0][0].set_yticks(positions)
    axes[0][0].set_yticklabels(labels, fontsize=8)
    fig.suptitle(f"{title}: dots = {aggregate.unit_kind}s; ★ best, ≈ tied with it", fontsize=10)
    fig.tight_layout()
    return _save_figure(fig, path)


def guidance_key(table: SweepTable) -> str | None:
    """The guidance scale the sweep varies (``guidance.scale`` / ``guidance.cfg_scale``), if any."""
    return next((key for key in GUIDANCE_KEYS if key in table.varying), None)


def _metric_like(table: SweepTable, *names: str) -> str | None:
    """The first metric key (largest sample count) whose base name is one of ``names``, in that order."""
    keys = {k for run in table.runs for k, v in run.metrics.items() if _finite(v)}
    for name in names:
        found = sorted((k for k in keys if base_name(k) == name), key=_sample_count)
        if found:
            return found[-1]
    return None


def plot_tradeoff(table: SweepTable, path: str | Path, key: str, aggregate: Aggregate | None = None) -> Path:
    """The guidance trade-off in three panels, one point per completed run (with seed axes: per row, at its means
    over the seeds), joined in scale order and labelled with the scale: FID vs IS (fidelity vs diversity),
    precision vs recall, class accuracy vs scale."""
    from matplotlib.figure import Figure  # not pyplot: no GUI backend to choose, no global figure to close

    if aggregate is not None:
        sources = [(group.values, {m: s.mean for m, s in group.stats.items()}) for group in aggregate.groups]
    else:
        sources = [(_override_dict(run.overrides), run.metrics) for run in table.runs if run.status == "completed"]
    points = []
    for values, metrics in sources:
        try:
            points.append((float(values[key]), metrics))
        except (KeyError, ValueError):
            continue
    points.sort(key=lambda p: p[0])
    panels = [(_metric_like(table, "is_mean", "is_clf_mean"), _metric_like(table, "fid")),
              (_metric_like(table, "recall"), _metric_like(table, "precision")),
              (key, _metric_like(table, "class_accuracy"))]
    fig = Figure(figsize=(14, 4.2))
    axes = fig.subplots(1, 3)
    for ax, (x_name, y_name) in zip(axes, panels, strict=True):
        pairs = [(scale, scale if x_name == key else metrics.get(x_name), metrics.get(y_name))
                 for scale, metrics in points]
        pairs = [(s, x, y) for s, x, y in pairs if _finite(x) and _finite(y)]
        if x_name is None or y_name is None or not pairs:
            ax.text(0.5, 0.5, "no values", ha="center", va="center", transform=ax.transAxes)
        else:
            ax.plot([x for _, x, _ in pairs], [y for _, _, y in pairs], "o-", color="tab:blue")
            for scale, x, y in pairs:
                ax.annotate(f"{scale:g}", (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
        ax.set_xlabel(key if x_name == key else display_name(x_name or "n/a"))
        ax.set_ylabel(display_name(y_name or "n/a"))
        ax.grid(alpha=0.3)
    axes[0].set_title("fidelity vs diversity (labels: scale)", fontsize=10)
    axes[1].set_title("precision vs recall", fontsize=10)
    axes[2].set_title("class accuracy of the samples", fontsize=10)
    fig.suptitle(f"{table.sweep_dir.name}: {key}" + (" (means over seeds)" if aggregate else ""), fontsize=10)
    fig.tight_layout()
    return _save_figure(fig, path)


def write_report(sweep_dir: str | Path, out_dir: str | Path | None = None, metric: str | None = None,
                 mode: str | None = None, stale_after_s: float = 3600.0, make_plot: bool = True,
                 title: str | None = None, seed_keys: Sequence[str] = SEED_KEYS,
                 baseline: str | None = None) -> dict[str, Any]:
    """``report.md``, ``report.csv`` and ``report.png`` for ``sweep_dir`` in ``out_dir`` (default: the sweep); with
    seed axes (``seed_keys`` taking several values) also ``report_summary.csv``, and the tables and plot per row
    over seeds compared with ``baseline`` (default: the first row)."""
    runs = collect_runs(sweep_dir, stale_after_s)
    table = build_table(runs, sweep_dir, metric=metric, mode=mode)
    expected = expected_jobs(sweep_dir)
    missing = missing_jobs(runs, expected)
    rows = aggregate(table, seed_keys=seed_keys, baseline=baseline, expected=expected)
    if rows is None and baseline is not None:
        raise ValueError(f"baseline={baseline!r} needs seed axes (one of {', '.join(seed_keys)} with several values)")
    out_dir = Path(out_dir) if out_dir is not None else Path(sweep_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    markdown = to_markdown(table, title, aggregate=rows, missing=missing)
    write_text(out_dir / "report.md", markdown)
    paths = {"markdown": out_dir / "report.md", "csv": write_csv(table, out_dir / "report.csv", rows)}
    if rows is not None:
        paths["summary_csv"] = write_summary_csv(rows, out_dir / "report_summary.csv")
    if make_plot:
        paths["plot"] = (plot(table, out_dir / "report.png") if rows is None
                         else plot_rows(rows, out_dir / "report.png", title=table.sweep_dir.name))
        key = guidance_key(table)
        if key is not None:
            paths["tradeoff"] = plot_tradeoff(table, out_dir / "report_tradeoff.png", key, rows)
    return {"table": table, "aggregate": rows, "missing": missing, "markdown": markdown, "paths": paths}
