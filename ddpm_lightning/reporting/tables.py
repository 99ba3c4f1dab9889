"""Writing a sweep's tables: the markdown report and the CSVs (every run; with seed axes one line per row and metric).

The columns of the markdown table and their order are ``TABLE_METRICS`` (the CSVs have every metric).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..artifacts import write_text
from .display import arrow, display_name, fmt, paired_cell, stats_cell
from .multiple import correction_lines
from .read import STATUSES, override_dict, read_yaml
from .stats import (
    CONFIDENCE,
    NO_VERDICT,
    TABLE_PREFIXES,
    VERDICT_REL,
    VERDICT_SE,
    Aggregate,
    Paired,
    RowGroup,
    SweepTable,
    base_name,
    metric_mode,
)

# the columns of the markdown table, in this order (CSV has every metric)
TABLE_METRICS = ("fid", "fid_inf", "sfid", "is_clf_mean", "is_mean", "precision", "recall", "kid_mean", "kid_std",
                 "class_accuracy", "vlb_bpd", "nll_bpd")
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
SUMMARY_COLUMNS = ("row", "metric", "mode", "n", "mean", "std", "ci_low", "ci_high", "sampling_std", "seeds_done",
                   "seeds_expected", "baseline", "pairs", "diff_mean", "diff_std", "diff_se", "diff_ci_low",
                   "diff_ci_high", "verdict", "best", "tied_with_best", "p_value", "p_adjusted", "correction",
                   "tests", "power_seeds")


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


def metric_columns(table: SweepTable) -> list[str]:
    """The metrics shown in the markdown table: the ranking metric and the sample-quality / NLL ones."""
    keys = {k for run in table.runs for k in run.metrics if k.startswith(TABLE_PREFIXES)}
    order = {name: i for i, name in enumerate(TABLE_METRICS)}
    shown = sorted((k for k in keys if base_name(k) in order), key=lambda k: (order[base_name(k)], k))
    if table.metric and table.metric not in shown:
        shown.insert(0, table.metric)
    return shown


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


def _runs_cell(aggregate: Aggregate, group: RowGroup) -> str:
    status = group.seed_status(aggregate.seed_label)
    done = sum(s == "completed" for s in status.values())
    others = [f"{seed} {s}" for seed, s in status.items() if s != "completed"]
    return _escape(f"{done}/{len(status)}" + (": " + ", ".join(others) if others else ""))


def _aggregate_lines(table: SweepTable, aggregate: Aggregate) -> list[str]:
    metrics = metric_columns(table)
    keys = list(aggregate.groups[0].values) or ["row"]
    lines = [f"## Rows: mean ± {CONFIDENCE:.0%} t-interval half-width (sd) over {aggregate.unit_kind}s", "",
             "| " + " | ".join([*keys, "seeds done", *(f"{display_name(m)} {arrow(m)}" for m in metrics)]) + " |",
             "|" + "|".join(["---"] * (len(keys) + 1 + len(metrics))) + "|"]
    for i, group in enumerate(aggregate.groups):
        label = [_escape(v) for v in group.values.values()] or ["all"]
        mark = (" ★ best" if i == aggregate.best else " ≈ tied" if i in aggregate.tied else "") + (
            " (baseline)" if i == aggregate.baseline else "")
        label[-1] += mark
        if i == aggregate.best:
            label = [f"**{cell}**" for cell in label]
        cells = [stats_cell(group.stats.get(m), group.within_std.get(m)) for m in metrics]
        lines.append("| " + " | ".join([*label, _runs_cell(aggregate, group), *cells]) + " |")
    compared = [m for m in metrics if base_name(m) not in NO_VERDICT]
    base = aggregate.groups[aggregate.baseline]
    lines += ["", f"## Paired differences against the baseline `{base.label}`: row - baseline, mean "
              f"[{CONFIDENCE:.0%} t-interval], verdict", "",
              "| " + " | ".join([*keys, "pairs", *(f"{display_name(m)} {arrow(m)}" for m in compared)]) + " |",
              "|" + "|".join(["---"] * (len(keys) + 1 + len(compared))) + "|"]
    for i, group in enumerate(aggregate.groups):
        if i == aggregate.baseline:
            continue
        label = [_escape(v) for v in group.values.values()] or ["all"]
        pairs = max((group.vs_baseline[m].diff.n for m in compared if m in group.vs_baseline), default=0)
        lines.append("| " + " | ".join([*label, str(pairs), *(paired_cell(group.vs_baseline.get(m))
                                                               for m in compared)]) + " |")
    lines += ["", verdict_rule(aggregate), "", *correction_lines(aggregate),
              best_rule(aggregate) if aggregate.metric else "", ""]
    return lines


def _seed_lines(aggregate: Aggregate) -> list[str]:
    def values(key: str) -> str:
        found = list(dict.fromkeys(override_dict(g.split())[key] for group in aggregate.groups
                                   for g in group.expected if key in override_dict(g.split())))
        return ", ".join(found)

    units = " ".join(f"`{k}` = {values(k)}" for k in aggregate.unit_axes)
    lines = [f"Seeds: {units} ({aggregate.unit_kind}): n counts {aggregate.unit_kind}s."]
    if aggregate.inner_axes:
        inner = " ".join(f"`{k}` = {values(k)}" for k in aggregate.inner_axes)
        lines.append(f"Sampling seeds {inner} are averaged within each training seed; their pooled spread is "
                     "shown as `sampling sd`, apart from the training-seed sd.")
    return lines


def to_markdown(table: SweepTable, title: str | None = None, aggregate: Aggregate | None = None,
                missing: Sequence[dict[str, str]] = (), sections: Sequence[str] = ()) -> str:
    """The report: a header (counts, common overrides, ranking, notes, jobs not started), the lines of
    ``sections`` (held-out selection, added seeds), with seed axes the aggregated rows, their paired differences
    and the rules, then one table row per job."""
    counts = {s: sum(r.status == s for r in table.runs) for s in (*STATUSES, *(r.status for r in table.runs))}
    metrics = metric_columns(table)
    lines = [f"# {title or 'Sweep report: ' + table.sweep_dir.name}", "",
             f"`{table.sweep_dir}`: {len(table.runs)} runs: "
             + ", ".join(f"{n} {s}" for s, n in counts.items() if n) + "."]
    if missing:
        jobs = [*(override_dict(run.overrides) for run in table.runs), *missing]
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
    optuna = read_yaml(table.sweep_dir / "optimization_results.yaml")
    if isinstance(optuna, dict) and "best_value" in optuna:
        params = " ".join(f"`{k}={v}`" for k, v in (optuna.get("best_params") or {}).items())
        lines.append(f"Optuna: best value {optuna['best_value']} with {params}.")
    notes = [NOTES[key] for key in ("fid", "kid_mean", "class_accuracy", "vlb_bpd")
             if any(base_name(m) == key for m in metrics)]
    notes.append("params: trainable parameters of the network (the EMA copy not counted); fit min: wall time of "
                 "`trainer.fit` (training, validation and the end-of-training sampling and scoring).")
    lines += ["", *(f"- {note}" for note in notes), "", *sections]
    if aggregate is not None:
        lines += _aggregate_lines(table, aggregate)
        lines += ["## Runs (one per job and seed)", ""]
    best = table.best if mark_best else None
    head = ["job", *(table.varying or ["run"]), "status", "params", "steps", "fit min", *map(display_name, metrics)]
    lines += ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * len(head)) + "|"]
    for i, run in enumerate(table.runs):
        values = override_dict(run.overrides)
        label = [_escape(values.get(k, "")) for k in table.varying] or [_escape(table.label(run))]
        cells = []
        for metric in metrics:
            text = fmt(run.metrics.get(metric))
            cells.append(f"**{text}**" if i == best and metric == table.metric and text else text)
        minutes = "" if run.train_seconds is None else f"{run.train_seconds / 60:.1f}"
        row = [str(run.job if run.job is not None else ""), *label, _status(table, i, best),
               _params(run.num_parameters), "" if run.global_step is None else str(run.global_step), minutes, *cells]
        if i == best:
            row[1:1 + len(label)] = [f"**{cell}**" for cell in row[1:1 + len(label)]]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


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
            values = override_dict(run.overrides)
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


def write_summary_csv(aggregate: Aggregate, path: str | Path) -> Path:
    """One line per row and metric: the statistics over seeds, the paired difference against the baseline, its
    verdict, its paired t-test p (raw and adjusted) and for an inconclusive one the power estimate (empty for the
    baseline itself and for metrics without verdicts)."""
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
                    "tied_with_best": int(i in aggregate.tied and metric == aggregate.metric),
                    **_correction_columns(aggregate, paired if judged else None)})
        return write_text(path, handle.getvalue())


def _correction_columns(aggregate: Aggregate, paired: Paired | None) -> dict[str, Any]:
    """The summary CSV's p-value, adjusted p (over ``tests`` verdicts, by ``correction``) and power estimate
    (the seeds an inconclusive verdict would need, ``>1000`` past the cap); empty without a verdict."""
    if paired is None or aggregate.correction is None:
        return {}
    return {"p_value": paired.p, "p_adjusted": paired.p_adjusted, "tests": paired.tests,
            "correction": aggregate.correction.method if paired.p is not None else "",
            "power_seeds": paired.power.csv() if paired.power is not None else ""}
