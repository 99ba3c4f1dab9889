"""Statistics of a sweep: ranking runs by a metric, and with seed axes the rows over seeds, their paired
differences against a baseline row and a verdict per row and metric.

Seeds are an axis, not a row: when a seed override (``SEED_KEYS``: ``seed``, ``sample.seed``,
``callbacks.generative_metrics.seed``, ``train_seed``) takes several values, ``aggregate`` groups the jobs by their
overrides minus the seed axes and reports per metric the mean, std, n and a 95% t-interval, the paired difference
against a baseline row over the seeds both rows have (common random numbers), a verdict per row and metric
(``verdict``) and the best row by a rule that uses those differences (``Aggregate.best``). ``seed`` of a
``ddpm-train`` job is the training seed, and so is ``train_seed`` of a ``ddpm-eval`` job (the run behind its
checkpoint); the other keys, and ``seed`` of a ``ddpm-eval`` job, are sampling seeds. The unit of replication is
the training seed when one varies (sampling seeds are averaged inside it and their spread reported apart), else the
sampling seed. Metric directions come from ``config/choices.py``; scipy (imported when needed) gives t quantiles.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config.choices import HIGHER_IS_BETTER
from .read import RunRecord, override_dict

MODES = ("min", "max")
# overrides that are seeds: a sweep over them replicates rows instead of adding rows
SEED_KEYS = ("seed", "sample.seed", "callbacks.generative_metrics.seed", "train_seed")
# the seed keys that are the training seed in a ddpm-train job (in a ddpm-eval job `seed` is the sampling seed)
TRAINING_SEED_KEYS = ("seed",)
# the training seed in any job: ddpm-eval's train_seed names the run behind its ckpt (``ckpt=...${train_seed}...``)
EVAL_TRAINING_SEED_KEYS = ("train_seed",)
# the verdict rule: a paired difference is inconclusive below VERDICT_SE standard errors, when its CONFIDENCE
# t-interval contains 0, or below VERDICT_REL of the baseline's value (Dufour et al. 2026: FID gaps under ~1.3% are
# within what retraining moves)
VERDICT_SE = 2.0
VERDICT_REL = 0.013
CONFIDENCE = 0.95
VERDICTS = ("better", "worse", "inconclusive")
# spreads of one evaluation, not scores: aggregated and shown, never given a verdict
NO_VERDICT = ("kid_std",)
# metric prefixes ranked and shown: in-loop / end-of-training scores of ddpm-train, scores of ddpm-eval
TABLE_PREFIXES = ("val/", "eval/")


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
        values = override_dict(run.overrides)
        parts = [f"{key}={values[key]}" for key in self.varying if key in values]
        return " ".join(parts) or (f"job {run.job}" if run.job is not None else run.folder.name)


def base_name(metric: str) -> str:
    """``val/fid@200`` -> ``fid``; ``val/vlb_bpd`` -> ``vlb_bpd``."""
    return metric.rsplit("/", 1)[-1].split("@", 1)[0]


def metric_mode(metric: str) -> str:
    """``max`` for the ``config.choices.HIGHER_IS_BETTER`` names (IS / precision / recall / accuracy), ``min`` for
    its ``LOWER_IS_BETTER`` ones (FID, KID, bits/dim) and for any other name (losses)."""
    return "max" if base_name(metric) in HIGHER_IS_BETTER else "min"


def finite(value: float | None) -> bool:
    """A value that is neither None, NaN nor infinite."""
    return value is not None and not math.isnan(value) and not math.isinf(value)


def default_metric(runs: Sequence[RunRecord]) -> str | None:
    """The ``val/fid@n`` with the largest n any run has, else ``eval/fid@n`` (ddpm-eval sweeps), else
    ``val/vlb_bpd``, else None."""
    keys = {k for run in runs for k, v in run.metrics.items() if finite(v)}
    for prefix in TABLE_PREFIXES:
        fids = sorted((k for k in keys if base_name(k) == "fid" and k.startswith(prefix)), key=sample_count)
        if fids:
            return fids[-1]
    return "val/vlb_bpd" if "val/vlb_bpd" in keys else None


def sample_count(metric: str) -> float:
    """``val/fid@2k`` -> 2000.0; 0.0 without a count."""
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
                  if run.status == "completed" and finite(run.metrics.get(metric))]
        if scored:
            best = (min(scored) if mode == "min" else max(scored, key=lambda s: (s[0], -s[1])))[1]
    per_run = [override_dict(run.overrides) for run in runs]
    keys = list(dict.fromkeys(key for values in per_run for key in values))
    varying = [k for k in keys if len({values.get(k) for values in per_run}) > 1]
    common = [f"{k}={per_run[0][k]}" for k in keys if k not in varying]
    return SweepTable(sweep_dir=Path(sweep_dir), runs=runs, varying=varying, common=common, metric=metric,
                      mode=mode, best=best)


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
    values = [float(v) for v in values if finite(v)]
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
    if not finite(delta) or delta == 0 or not finite(se) or abs(delta) < se_factor * se:
        return "inconclusive"
    if pairs is not None:
        if pairs < 2:
            return "inconclusive"
        from scipy import stats

        if abs(delta) < float(stats.t.ppf(0.5 + CONFIDENCE / 2, pairs - 1)) * se:
            return "inconclusive"
    if finite(baseline) and abs(delta) < rel * abs(baseline):
        return "inconclusive"
    return "better" if (delta < 0) == (mode == "min") else "worse"


@dataclass
class Paired:
    """A row against a reference row over the seeds both have: the differences row - reference, the reference's
    mean over those seeds and the verdict."""

    diff: Stats
    reference: float | None
    verdict: str
    # filled by multiple.correct (ddpm-report): the paired t-test's two-sided p, the p adjusted over the verdicts
    # corrected with this one (``tests`` of them), whether that made a decided verdict inconclusive, and for an
    # inconclusive verdict the power estimate (multiple.PowerEstimate)
    p: float | None = None
    p_adjusted: float | None = None
    tests: int | None = None
    demoted: bool = False
    power: Any = None


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
    correction: Any = None  # multiple.Correction once the verdicts are corrected for multiple comparisons

    def seed_label(self, run_or_values: RunRecord | dict[str, str]) -> str:
        values = (override_dict(run_or_values.overrides) if isinstance(run_or_values, RunRecord)
                  else run_or_values)
        return " ".join(f"{k}={values.get(k, '')}" for k in self.seed_axes)


def aggregate(table: SweepTable, seed_keys: Sequence[str] = SEED_KEYS, baseline: str | None = None,
              expected: Sequence[dict[str, str]] | None = None) -> Aggregate | None:
    """Group ``table``'s runs by their overrides minus the seed axes and compare every row with ``baseline`` (a
    row label such as ``model=ddpm_base`` or some of its overrides; default: the first row). None when no seed key
    takes two values (the sweep reports run by run)."""
    jobs = [override_dict(run.overrides) for run in table.runs] + list(expected or [])
    seed_axes = [k for k in dict.fromkeys(k for values in jobs for k in values)
                 if k in seed_keys and len({values.get(k) for values in jobs}) > 1]
    if not seed_axes:
        return None
    training = any(run.kind == "train" for run in table.runs) or not table.runs
    train_axes = [k for k in seed_axes if (training and k in TRAINING_SEED_KEYS) or k in EVAL_TRAINING_SEED_KEYS]
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
        groups[tuple(row_values(override_dict(run.overrides)).items())].runs.append(run)
    rows = list(groups.values())

    metrics = sorted({k for run in table.runs for k in run.metrics})
    for group in rows:
        for metric in metrics:
            per_unit: dict[str, list[float]] = {}
            for run in group.runs:
                value = run.metrics.get(metric)
                if run.status == "completed" and finite(value):
                    per_unit.setdefault(unit_of(override_dict(run.overrides)), []).append(value)
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
    wanted_values = override_dict(wanted.split())
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
