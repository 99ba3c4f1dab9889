"""Sweep reports: a Hydra multirun folder becomes one table (markdown + CSV) and a bar plot, like ADM's Table 1.

One module per step, imported one way (``read`` <- ``stats`` <- ``display`` <- ``multiple`` <- ``select``, ``rerun``,
``provenance`` <- ``tables``, ``plots`` <- ``publish`` <- ``report``):

- ``read``: the job folders of a sweep, one ``RunRecord`` each (overrides, status, scores), and the jobs its
  ``multirun.yaml`` launches that have no folder yet (``expected_jobs``, through ``sweeps.expand_sweep``);
- ``stats``: ranking by a metric (``build_table``), and with seed axes the rows over seeds, their paired differences
  against a baseline row and a verdict per row and metric (``aggregate``, ``summarize``, ``verdict``);
- ``display``: display names (``config/choices.py``), arrows for the direction, number formats;
- ``multiple``: a paired t-test p per verdict, adjusted over the verdicts of a table (Benjamini-Hochberg, Holm or
  none: ``correct``), and for an inconclusive verdict the seeds that would separate it (``seeds_for_power``);
- ``select``: held-out selection, a row chosen on some seeds and reported on disjoint ones (``select_row``);
- ``rerun``: the commands that add seeds to the inconclusive rows (``plan_added_seeds``, ``add_seeds.sh``);
- ``provenance``: each row's code, machine and precision, and the pairing guard (``check_pairs``: no paired
  difference between jobs of other code, machines or precision unless allowed, then rows marked);
- ``tables``: the markdown report and the CSVs; ``plots``: the bar and trade-off plots;
- ``publish``: what ``ddpm-report --wandb`` sends to W&B (tables, plots, the sweep's group), as plain data;
- ``report``: ``write_report``, every file of a report (``ddpm-report``).

Metric names, directions and display names come from ``config/choices.py``. Plain Python: no torch or Lightning;
scipy for the t and noncentral t distributions, Hydra's override parser for the expected jobs, matplotlib (a
Figure, no pyplot) only when plotting. The names below are the package's API.
"""

from ..config.choices import DISPLAY_NAMES, HIGHER_IS_BETTER, LOWER_IS_BETTER
from .display import display_name
from .multiple import (
    ALPHA,
    CORRECTIONS,
    Correction,
    PowerEstimate,
    adjust,
    correct,
    p_value,
    power_estimate,
    seeds_for_power,
)
from .plots import GUIDANCE_KEYS, guidance_key, plot, plot_rows, plot_tradeoff
from .provenance import MIXED_MARK, check_pairs, mark_mixed, mixed_pairs, provenance_lines
from .publish import REPORT_RUN_FILE, csv_table, report_payload, sweep_identity
from .read import (
    ADDED_SEEDS_DIR,
    STATUSES,
    RunRecord,
    collect_runs,
    expected_jobs,
    find_job_folders,
    missing_jobs,
    read_run,
)
from .report import write_report
from .rerun import AddSeedsPlan, ReportSeedsPlan, plan_added_seeds, plan_report_seeds, undecided_rows, write_add_seeds
from .select import Selection, select_row, selection_json, split_seeds
from .stats import (
    CONFIDENCE,
    MODES,
    NO_VERDICT,
    SEED_KEYS,
    TABLE_PREFIXES,
    TRAINING_SEED_KEYS,
    VERDICT_REL,
    VERDICT_SE,
    VERDICTS,
    Aggregate,
    Paired,
    RowGroup,
    Stats,
    SweepTable,
    aggregate,
    base_name,
    build_table,
    default_metric,
    metric_mode,
    summarize,
    verdict,
)
from .tables import (
    NOTES,
    SUMMARY_COLUMNS,
    TABLE_METRICS,
    best_rule,
    metric_columns,
    to_markdown,
    verdict_rule,
    write_csv,
    write_summary_csv,
)

__all__ = [
    "ADDED_SEEDS_DIR", "ALPHA", "AddSeedsPlan", "Aggregate", "CONFIDENCE", "CORRECTIONS", "Correction",
    "DISPLAY_NAMES", "GUIDANCE_KEYS", "HIGHER_IS_BETTER", "LOWER_IS_BETTER", "MIXED_MARK", "MODES", "NOTES",
    "NO_VERDICT", "Paired", "PowerEstimate", "REPORT_RUN_FILE", "ReportSeedsPlan", "RowGroup", "RunRecord",
    "SEED_KEYS", "STATUSES", "SUMMARY_COLUMNS", "Selection", "Stats", "SweepTable", "TABLE_METRICS", "TABLE_PREFIXES",
    "TRAINING_SEED_KEYS", "VERDICTS", "VERDICT_REL", "VERDICT_SE", "adjust", "aggregate", "base_name", "best_rule",
    "build_table", "check_pairs", "collect_runs", "correct", "csv_table", "default_metric", "display_name",
    "expected_jobs", "find_job_folders", "guidance_key", "mark_mixed", "metric_columns", "metric_mode", "missing_jobs",
    "mixed_pairs", "p_value", "plan_added_seeds", "plan_report_seeds", "plot", "plot_rows", "plot_tradeoff",
    "power_estimate", "provenance_lines", "read_run", "report_payload", "seeds_for_power", "select_row",
    "selection_json", "split_seeds", "summarize", "sweep_identity", "to_markdown", "undecided_rows", "verdict",
    "verdict_rule", "write_add_seeds", "write_csv", "write_report", "write_summary_csv",
]
