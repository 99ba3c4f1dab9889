"""Many verdicts at once: a paired t-test p per verdict, the p-values adjusted over the verdicts of a table
(Benjamini-Hochberg by default, Holm, or none), and for an inconclusive verdict how many seeds would separate the
observed difference at the observed spread (a power estimate).

A verdict is **better** / **worse** only when the rule of ``stats.verdict`` holds (its t-interval excludes 0, 2
standard errors, 1.3% of the baseline) *and* its adjusted p is at most ``ALPHA``; the correction can only turn a
decided verdict into an inconclusive one. Families, each corrected on its own: the verdicts of the markdown's
paired-differences table (rows x shown metrics), the verdicts of the metrics that only ``report_summary.csv``
has (training losses and the like), and the comparisons with the best row (the ≈ ties). scipy (imported when
needed) gives the t and noncentral t distributions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from .display import fmt, signed
from .stats import CONFIDENCE, NO_VERDICT, VERDICT_REL, VERDICT_SE, Aggregate, Paired, Stats, base_name, finite

CORRECTIONS = ("bh", "holm", "none")
CORRECTION_NAMES = {"bh": "Benjamini-Hochberg", "holm": "Holm", "none": "none"}
ALPHA = round(1.0 - CONFIDENCE, 12)  # 0.05: the level of the printed 95% intervals
POWER = 0.8  # the power the seed estimate aims at
MAX_SEEDS = 1000  # beyond this the estimate says "> 1000"


def p_value(diff: Stats) -> float | None:
    """The two-sided p of the paired t-test on differences summarised by ``diff`` (``scipy.stats.ttest_rel`` on
    the two sides); None with fewer than 2 pairs. No spread: 0 for a nonzero mean difference, 1 for none."""
    if diff.n < 2 or not finite(diff.mean) or not finite(diff.std):
        return None
    if diff.std == 0:
        return 1.0 if diff.mean == 0 else 0.0
    from scipy import stats

    return float(2.0 * stats.t.sf(abs(diff.mean / diff.se), diff.n - 1))


def adjust(pvalues: Sequence[float], method: str) -> list[float]:
    """``pvalues`` adjusted for multiple comparisons: ``bh`` (Benjamini-Hochberg step-up, the false-discovery rate;
    as ``scipy.stats.false_discovery_control``), ``holm`` (Holm step-down, the family-wise error rate) or
    ``none``. Reject where the adjusted p <= alpha."""
    if method not in CORRECTIONS:
        raise ValueError(f"correction={method!r}; allowed: {', '.join(CORRECTIONS)}")
    m = len(pvalues)
    order = sorted(range(m), key=lambda i: pvalues[i])
    adjusted = [float(p) for p in pvalues]
    if method == "bh":
        running = 1.0
        for rank in range(m, 0, -1):  # from the largest p down: min over j >= rank of p_(j) * m / j
            i = order[rank - 1]
            running = min(running, pvalues[i] * m / rank)
            adjusted[i] = running
    elif method == "holm":
        running = 0.0
        for rank, i in enumerate(order):  # from the smallest p up: max over j <= rank of (m - j) p_(j), capped at 1
            running = max(running, min(1.0, (m - rank) * pvalues[i]))
            adjusted[i] = running
    return adjusted


def seeds_for_power(delta: float, sd: float, alpha: float = ALPHA, power: float = POWER,
                    max_seeds: int = MAX_SEEDS) -> int | None:
    """The fewest pairs n (2 <= n <= ``max_seeds``) at which a two-sided paired t-test at level ``alpha`` would
    decide a true mean difference ``delta`` with spread ``sd`` with probability ``power``: P(|T| >= c) with T
    noncentral t (n - 1 degrees of freedom, noncentrality delta / sd * sqrt(n)) and c the larger of the t quantile
    and the verdict's ``VERDICT_SE`` standard errors. None when even ``max_seeds`` pairs fall short."""
    import numpy as np
    from scipy import stats

    if sd == 0:
        return 2 if delta != 0 else None
    for low, high in ((2, 100), (101, max_seeds)):  # most answers are small: look there first
        n = np.arange(low, high + 1)
        if n.size == 0:
            continue
        critical = np.maximum(stats.t.ppf(1.0 - alpha / 2.0, n - 1), VERDICT_SE)
        shift = abs(delta) / sd * np.sqrt(n)
        # the lower tail is ~0 where scipy's nct.cdf gives NaN (large noncentrality)
        lower = np.nan_to_num(stats.nct.cdf(-critical, n - 1, shift), nan=0.0)
        reached = np.nonzero(stats.nct.sf(critical, n - 1, shift) + lower >= power)[0]
        if reached.size:
            return int(n[reached[0]])
    return None


@dataclass
class PowerEstimate:
    """How many seeds (pairs with the reference) would separate an inconclusive difference: ``seeds`` (None:
    more than ``MAX_SEEDS``, or ``note`` says why no number applies)."""

    seeds: int | None
    delta: float | None
    sd: float | None
    alpha: float
    note: str = ""

    def text(self) -> str:
        if self.note:
            return f"power estimate: none ({self.note})"
        at = f"Δ={signed(self.delta)} at sd={fmt(self.sd)} ({POWER:.0%} power, α={self.alpha:.2g})"
        if self.seeds is None:
            return f"power estimate: > {MAX_SEEDS} seeds would be needed to separate {at}"
        return f"power estimate: ~{self.seeds} seeds would separate {at}"

    def csv(self) -> str:
        return "" if self.note else f">{MAX_SEEDS}" if self.seeds is None else str(self.seeds)


@dataclass
class Family:
    """Verdicts corrected together: (row label, metric, paired difference) with a p-value each."""

    name: str
    cells: list[tuple[str, str, Paired]] = field(default_factory=list)
    rejected: int = 0  # adjusted p <= alpha
    demoted: list[tuple[str, str]] = field(default_factory=list)  # (row, metric) made inconclusive

    def level(self, method: str, alpha: float, rejected: bool) -> float:
        """The level a verdict of this family must reach with the others as they are: with k = the rejections
        counting it, BH rejects it at p <= k alpha / m and Holm at p <= alpha / (m - k + 1)."""
        m, k = len(self.cells), self.rejected + (0 if rejected else 1)
        return alpha if method == "none" or m == 0 else k * alpha / m if method == "bh" else alpha / (m - k + 1)


@dataclass
class Correction:
    """The correction applied to an ``Aggregate``'s verdicts (``Aggregate.correction``)."""

    method: str
    alpha: float
    table: Family
    other: Family
    best: Family


def correct(aggregate: Aggregate, method: str = "bh", table_metrics: Sequence[str] = (),
            alpha: float = ALPHA) -> Correction:
    """Adjust the p-values of ``aggregate``'s verdicts per family, make the decided verdicts whose adjusted p
    exceeds ``alpha`` inconclusive (``Paired.demoted``; not with ``none``, whose verdicts stay as ``verdict`` gave
    them), recompute the ≈ ties with the best row, and attach a power estimate to every inconclusive verdict.
    ``table_metrics``: the metrics of the markdown table (the first family); the others form the second."""
    if method not in CORRECTIONS:
        raise ValueError(f"correction={method!r}; allowed: {', '.join(CORRECTIONS)}")
    table, other, best = Family("table"), Family("csv"), Family("best")
    judged: list[tuple[Family | None, Paired]] = []
    for i, group in enumerate(aggregate.groups):
        for metric, paired in group.vs_baseline.items() if i != aggregate.baseline else ():
            if base_name(metric) in NO_VERDICT:
                continue
            paired.p = p_value(paired.diff)
            family = (table if metric in table_metrics else other) if paired.p is not None else None
            if family is not None:
                family.cells.append((group.label, metric, paired))
            judged.append((family, paired))
        if group.vs_best is not None:
            group.vs_best.p = p_value(group.vs_best.diff)
            if group.vs_best.p is not None:
                best.cells.append((group.label, aggregate.metric, group.vs_best))
    for family in (table, other, best):
        _apply(family, method, alpha)
    if aggregate.best is not None:
        aggregate.tied = [i for i, g in enumerate(aggregate.groups)
                          if i != aggregate.best and g.vs_best is not None and g.vs_best.verdict == "inconclusive"]
    for family, paired in judged:
        if paired.verdict == "inconclusive":
            rejected = paired.p_adjusted is not None and paired.p_adjusted <= alpha
            level = family.level(method, alpha, rejected) if family is not None else alpha
            paired.power = power_estimate(paired, level)
    aggregate.correction = Correction(method=method, alpha=alpha, table=table, other=other, best=best)
    return aggregate.correction


def _apply(family: Family, method: str, alpha: float) -> None:
    adjusted = adjust([paired.p for _, _, paired in family.cells], method)
    for (label, metric, paired), p in zip(family.cells, adjusted, strict=True):
        paired.p_adjusted, paired.tests = p, len(family.cells)
        if p <= alpha:
            family.rejected += 1
        elif method != "none" and paired.verdict != "inconclusive":
            paired.verdict, paired.demoted = "inconclusive", True
            family.demoted.append((label, metric))


def power_estimate(paired: Paired, alpha: float = ALPHA) -> PowerEstimate:
    """The seeds an inconclusive paired difference would need (``seeds_for_power`` at the observed mean and sd), or
    why no number applies: fewer than 2 pairs, no difference, or one under ``VERDICT_REL`` of the reference."""
    diff = paired.diff
    estimate = PowerEstimate(seeds=None, delta=diff.mean, sd=diff.std, alpha=alpha)
    if diff.n < 2 or not finite(diff.std):
        estimate.note = f"{diff.n} pair{'s' if diff.n != 1 else ''}: no spread to extrapolate from"
    elif not finite(diff.mean) or diff.mean == 0:
        estimate.note = "no difference observed"
    elif finite(paired.reference) and abs(diff.mean) < VERDICT_REL * abs(paired.reference):
        estimate.note = (f"|Δ|={fmt(abs(diff.mean))} is under {VERDICT_REL:.1%} of the baseline's "
                         f"{fmt(paired.reference)}: no seed count decides it")
    else:
        estimate.seeds = seeds_for_power(diff.mean, diff.std, alpha)
    return estimate


def correction_lines(aggregate: Aggregate) -> list[str]:
    """The correction's rule and its effect (under the paired-differences table), then the power estimates of the
    inconclusive rows on the primary metric."""
    correction = aggregate.correction
    if correction is None:
        return []
    method, table = correction.method, correction.table
    changed = (f"it made {len(table.demoted)} decided verdict{'s' if len(table.demoted) != 1 else ''} "
               "inconclusive (marked †)" if table.demoted else "it changed no verdict")
    if method == "none":
        rule = (f"Multiple comparisons: no correction (`--no-correction`): each of the {len(table.cells)} verdicts "
                f"of this table is a paired t-test at {correction.alpha:g} on its own, so about "
                f"{correction.alpha:.0%} of the rows and metrics that do not differ are expected to read better "
                "or worse.")
    else:
        controls = "false-discovery rate" if method == "bh" else "family-wise error rate"
        rule = (f"Multiple comparisons: {CORRECTION_NAMES[method]} over the {len(table.cells)} verdicts of this "
                f"table (rows x metrics with >= 2 pairs), {controls} {correction.alpha:g}: a verdict is better or "
                f"worse only when its adjusted paired t-test p <= {correction.alpha:g} and the rule above holds; "
                f"{changed}.")
        if correction.best.cells:
            rule += f" The ≈ ties use it over the {len(correction.best.cells)} comparisons with the best row."
        if correction.other.cells:
            rule += (" The metrics only in report_summary.csv are corrected as a family of their own "
                     f"({len(correction.other.cells)} verdicts).")
        rule += f" `--correction {'holm' if method == 'bh' else 'bh'}` or `--no-correction` for the others."
    lines = [rule, ""]
    rows = [(g.label, g.vs_baseline[aggregate.metric]) for i, g in enumerate(aggregate.groups)
            if i != aggregate.baseline and aggregate.metric in g.vs_baseline
            and g.vs_baseline[aggregate.metric].power is not None]
    if rows:
        lines += [f"Inconclusive rows on `{aggregate.metric}`: the {aggregate.unit_kind}s (pairs with the baseline) "
                  f"at which a paired t-test would separate the observed mean difference Δ at the observed sd with "
                  f"{POWER:.0%} power (noncentral t; at the level the correction asks of that verdict with the "
                  "others as they are, and >= 2 standard errors). Δ and sd come from these few seeds, so the "
                  "counts are rough; `--add-seeds K` writes the commands that add seeds.", ""]
        lines += [f"- `{label}`: {paired.power.text()}" for label, paired in rows]
        lines.append("")
    return lines
