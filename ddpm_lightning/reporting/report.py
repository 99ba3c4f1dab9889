"""``write_report``: a sweep folder's ``report.md``, ``report.csv``, ``report_summary.csv`` and plots; with
``select`` also ``selection.json`` (and ``report_seeds.sh`` when the chosen rows lack report seeds), with
``add_seeds`` also ``add_seeds.sh``; every row's provenance, and no paired difference between jobs of other code,
machines or precision unless ``allow_mixed``."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..artifacts import write_json, write_text
from .compare import compare_selections, comparison_json, comparison_lines
from .curves import is_series, plot_steps, series_expected
from .multiple import correct
from .plots import guidance_key, plot, plot_rows, plot_tradeoff
from .provenance import check_pairs, mark_mixed, provenance_lines
from .read import collect_runs, expected_jobs, missing_jobs
from .rerun import (
    REPORT_SCRIPT,
    SCRIPT,
    add_seeds_lines,
    plan_added_seeds,
    plan_report_seeds,
    report_seeds_lines,
    write_add_seeds,
)
from .select import select_rows, selection_lines, selections_json, summary_lines
from .stats import SEED_KEYS, aggregate, build_table
from .tables import metric_columns, to_markdown, write_csv, write_summary_csv


def write_report(sweep_dir: str | Path, out_dir: str | Path | None = None, metric: str | None = None,
                 mode: str | None = None, stale_after_s: float = 3600.0, make_plot: bool = True,
                 title: str | None = None, seed_keys: Sequence[str] = SEED_KEYS,
                 baseline: str | None = None, correction: str = "bh", select: bool = False,
                 select_seeds: Sequence[Any] | str | None = None, report_seeds: Sequence[Any] | str | None = None,
                 add_seeds: int | None = None, allow_mixed: bool = False,
                 select_per: Sequence[str] | str | None = None) -> dict[str, Any]:
    """``report.md``, ``report.csv`` and ``report.png`` for ``sweep_dir`` in ``out_dir`` (default: the sweep); with
    seed axes (``seed_keys`` taking several values) also ``report_summary.csv``, and the tables and plot per row
    over seeds compared with ``baseline`` (default: the first row), the verdicts corrected for multiple comparisons
    by ``correction`` (``bh``, ``holm`` or ``none``: ``multiple.correct``).

    ``select`` (or either seed set given): the row chosen on ``select_seeds`` and reported on the disjoint
    ``report_seeds`` (``select.split_seeds`` for the defaults), in the markdown and ``selection.json``; with
    ``select_per`` (override keys, ``guidance``: the guidance method) one row per group of rows (``select_rows``);
    ``report_seeds.sh`` runs the report seeds the chosen rows lack (``rerun.plan_report_seeds``).
    ``add_seeds`` = K: ``add_seeds.sh``, the commands that run K new seeds for the inconclusive rows and the
    baseline into the sweep folder (``rerun.plan_added_seeds``). Paired jobs (the same seed in two compared rows) whose
    code, CPU/GPU or precision differ are refused unless ``allow_mixed`` (``provenance.check_pairs``; then those rows
    are marked). Bad input raises ValueError before any file is written."""
    runs = collect_runs(sweep_dir, stale_after_s)
    table = build_table(runs, sweep_dir, metric=metric, mode=mode)
    expected = expected_jobs(sweep_dir)
    missing = missing_jobs(runs, expected)
    rows = aggregate(table, seed_keys=seed_keys, baseline=baseline, expected=series_expected(table, expected))
    select = select or select_seeds is not None or report_seeds is not None or bool(select_per)
    wanted = [name for name, on in ((f"baseline={baseline!r}", baseline is not None),
                                     ("held-out selection (--select)", select), ("--add-seeds", add_seeds is not None))
              if on]
    if rows is None and wanted:
        raise ValueError(f"{' and '.join(wanted)} need{'s' if len(wanted) == 1 else ''} seed axes "
                         f"(one of {', '.join(seed_keys)} with several values)")
    mixed = check_pairs(rows, allow_mixed)
    out_dir = Path(out_dir) if out_dir is not None else Path(sweep_dir)
    sections, selections, comparisons, plan, to_report = [], [], [], None, None
    if rows is not None:
        correct(rows, correction, metric_columns(table))
        if select:
            selections = select_rows(rows, select_seeds, report_seeds, per=select_per)
            sections += summary_lines(selections, metric_columns(table))
            comparisons = compare_selections(selections, metric_columns(table), correction)
            sections += comparison_lines(comparisons, selections, correction)
            sections += [line for chosen in selections for line in selection_lines(chosen, metric_columns(table))]
            to_report = plan_report_seeds(rows, selections, sweep_dir)
            sections += report_seeds_lines(to_report, out_dir / REPORT_SCRIPT)
        if add_seeds is not None:
            plan = plan_added_seeds(rows, table, sweep_dir, add_seeds)
            sections += add_seeds_lines(plan, out_dir / SCRIPT)
    mark_mixed(rows, mixed)
    out_dir.mkdir(parents=True, exist_ok=True)
    markdown = to_markdown(table, title, aggregate=rows, missing=missing, sections=sections)
    markdown += "\n".join(provenance_lines(table, rows, mixed)) + "\n"  # after the tables
    write_text(out_dir / "report.md", markdown)
    paths = {"markdown": out_dir / "report.md", "csv": write_csv(table, out_dir / "report.csv", rows)}
    if rows is not None:
        paths["summary_csv"] = write_summary_csv(rows, out_dir / "report_summary.csv")
    if selections:
        paths["selection"] = write_json(out_dir / "selection.json", selections_json(
            selections, sweep_dir, select_per, [comparison_json(c) for c in comparisons]))
    if plan is not None and plan.commands:
        paths["add_seeds"] = write_add_seeds(plan, out_dir / SCRIPT)
    if to_report is not None and to_report.commands:
        paths["report_seeds"] = write_add_seeds(to_report, out_dir / REPORT_SCRIPT)
    if make_plot:
        paths["plot"] = (plot(table, out_dir / "report.png") if rows is None
                         else plot_rows(rows, out_dir / "report.png", title=table.sweep_dir.name))
        key = guidance_key(table)
        if key is not None:
            paths["tradeoff"] = plot_tradeoff(table, out_dir / "report_tradeoff.png", key, rows)
        if is_series(table):  # ddpm-eval ckpts=<run>: every metric against the training step
            paths["steps"] = plot_steps(table, rows, out_dir / "report_steps.png")
    return {"table": table, "aggregate": rows, "missing": missing, "markdown": markdown, "paths": paths,
            "selection": selections[0] if selections else None, "selections": selections,
            "comparisons": comparisons, "add_seeds": plan,
            "report_seeds": to_report,
            "mixed": {rows.groups[i].label: fields for i, fields in mixed.items()}}
