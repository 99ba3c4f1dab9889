"""``write_report``: a sweep folder's ``report.md``, ``report.csv``, ``report_summary.csv`` and plots."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..artifacts import write_text
from .plots import guidance_key, plot, plot_rows, plot_tradeoff
from .read import collect_runs, expected_jobs, missing_jobs
from .stats import SEED_KEYS, aggregate, build_table
from .tables import to_markdown, write_csv, write_summary_csv


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
