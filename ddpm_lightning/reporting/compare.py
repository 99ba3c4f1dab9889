"""Held-out comparisons of the chosen rows of a ``--select-per`` selection (``select.select_rows``): every pair of
groups' chosen rows on the report seeds only, paired by seed, with the verdict rule of ``stats.verdict`` and the
p-values adjusted over the table (``multiple.adjust``)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .display import arrow, display_name, paired_cell
from .multiple import ALPHA, CORRECTION_NAMES, adjust, p_value
from .select import Selection, seed_order
from .stats import CONFIDENCE, NO_VERDICT, Paired, base_name, metric_mode, summarize, verdict


@dataclass
class Comparison:
    """Two groups' chosen rows on the report seeds both have: ``paired`` = row - reference, per metric."""

    group: str
    reference: str
    metric: str
    paired: Paired


def compare_selections(selections: Sequence[Selection], metrics: Sequence[str],
                       correction: str = "bh") -> list[Comparison]:
    """Every pair of groups' chosen rows (``--select-per``; earlier group as the row, later as the reference),
    per metric of ``metrics`` that both have: the paired differences over the report seeds both have, the verdict
    of ``stats.verdict``, and the paired t-test's p adjusted by ``correction`` over all these verdicts (a decided
    verdict whose adjusted p exceeds ``ALPHA`` becomes inconclusive, ``demoted``). Empty for one selection."""
    found = []
    for i, row in enumerate(selections):
        for reference in selections[i + 1:]:
            for metric in (m for m in metrics if base_name(m) not in NO_VERDICT):  # spreads get no verdict
                mine, theirs = row.reported_values.get(metric, {}), reference.reported_values.get(metric, {})
                common = sorted(set(mine) & set(theirs), key=seed_order)
                if not common:
                    continue
                diff = summarize([mine[s] - theirs[s] for s in common])
                base = math.fsum(theirs[s] for s in common) / len(common)
                paired = Paired(diff=diff, reference=base, p=p_value(diff),
                                verdict=verdict(diff.mean, diff.se, base, metric_mode(metric), pairs=diff.n))
                found.append(Comparison(row.group or "", reference.group or "", metric, paired))
    tested = [c for c in found if c.paired.p is not None]
    for c, adjusted in zip(tested, adjust([c.paired.p for c in tested], correction), strict=True):
        c.paired.p_adjusted, c.paired.tests = adjusted, len(tested)
        if c.paired.verdict != "inconclusive" and adjusted > ALPHA:
            c.paired.verdict, c.paired.demoted = "inconclusive", True
    return found


def comparison_lines(comparisons: Sequence[Comparison], selections: Sequence[Selection],
                     correction: str = "bh") -> list[str]:
    """The markdown section of ``compare_selections``: a row per pair of groups, a column per metric."""
    if not comparisons:
        return []
    metrics = list(dict.fromkeys(c.metric for c in comparisons))
    pairs = list(dict.fromkeys((c.group, c.reference) for c in comparisons))
    cells = {(c.group, c.reference, c.metric): c.paired for c in comparisons}
    first = selections[0]
    tests = max((c.paired.tests or 0 for c in comparisons), default=0)
    lines = [f"## Held-out comparisons of the chosen rows: on `{first.axis}` = {', '.join(first.report_seeds)}", "",
             "Each group's chosen row against each later group's, paired by report seed (neither choice saw these "
             f"seeds): mean difference (row - compared with) [{CONFIDENCE:.0%} t-interval], verdict by the rule "
             f"under the paired-differences table; p adjusted over these {tests} verdicts "
             f"({CORRECTION_NAMES[correction]}), † = made inconclusive by it.", "",
             "| row | compared with | " + " | ".join(f"Δ {display_name(m)} {arrow(m)}" for m in metrics) + " |",
             "|" + "---|" * (len(metrics) + 2)]
    for group, reference in pairs:
        row = [group, reference, *(paired_cell(cells.get((group, reference, m))) for m in metrics)]
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |")
    return [*lines, ""]


def comparison_json(comparison: Comparison) -> dict[str, Any]:
    diff = comparison.paired.diff

    def number(value: float | None) -> float | None:
        return None if value is None or not math.isfinite(value) else value

    return {"row": comparison.group, "compared_with": comparison.reference, "metric": comparison.metric,
            "n": diff.n, "mean_difference": number(diff.mean), "ci_low": number(diff.low),
            "ci_high": number(diff.high), "p": comparison.paired.p, "p_adjusted": comparison.paired.p_adjusted,
            "verdict": comparison.paired.verdict, "demoted_by_correction": comparison.paired.demoted}
