"""What ``ddpm-report --wandb`` publishes, as plain data (``cli/report.py`` turns it into a W&B run of
``job_type=report`` in the sweep's group):

- ``tables``: the aggregated table (``report_summary.csv``: row, metric, n, mean, std, interval, paired difference
  and its interval, verdict, ...) and the per-job table (``report.csv``), as columns and rows (numbers as floats);
- ``images``: ``report.png`` and, for a guidance sweep, ``report_tradeoff.png``;
- ``identity``: the W&B project and group of the sweep, the ones its jobs logged to (their ``wandb_run.json``), else
  the group ``ddpm-train -m`` gives a sweep (``<task>-<sweep folder>``);
- ``config``: the sweep folder, primary metric, baseline, correction and each row's provenance.
"""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path
from typing import Any

from ..artifacts import WANDB_RUN_FILE, read_json
from .provenance import describe
from .read import read_yaml

REPORT_RUN_FILE = "wandb_report_run.json"  # the report's own W&B run, kept in the report folder
DEFAULT_PROJECT = "ddpm_lightning"


def _cell(value: str) -> Any:
    if value == "":
        return None
    try:
        return float(value)
    except ValueError:
        return value


def csv_table(path: str | Path) -> tuple[list[str], list[list[Any]]]:
    """A CSV file's header and rows, numbers as floats and empty cells as None."""
    with open(path, newline="") as handle:
        reader = csv.reader(handle)
        columns = next(reader, [])
        return columns, [[_cell(value) for value in row] for row in reader]


def sweep_identity(table: Any) -> dict[str, str]:
    """The W&B project and group of the sweep's jobs (the most common among their kept runs), else the default
    project and the group ``ddpm-train -m`` names a sweep by (``loggers.wandb_defaults``)."""
    records = [read_json(run.folder / WANDB_RUN_FILE) or {} for run in table.runs]
    projects = Counter(r["project"] for r in records if r.get("project"))
    groups = Counter(r["group"] for r in records if r.get("group"))
    sweep = Path(table.sweep_dir).resolve().name
    config = read_yaml(table.runs[0].folder / ".hydra" / "config.yaml") if table.runs else None
    task = str((config or {}).get("task_name") or "train") if isinstance(config, dict) else "train"
    return {"project": projects.most_common(1)[0][0] if projects else DEFAULT_PROJECT,
            "group": groups.most_common(1)[0][0] if groups else (sweep if task in sweep else f"{task}-{sweep}")}


def report_payload(result: dict[str, Any]) -> dict[str, Any]:
    """The tables, images, identity and config of a ``write_report`` result (see the module docstring)."""
    table, rows, paths = result["table"], result["aggregate"], result["paths"]
    tables = {"report/jobs": csv_table(paths["csv"])}
    if "summary_csv" in paths:
        tables = {"report/summary": csv_table(paths["summary_csv"]), **tables}
    images = {key: Path(paths[name]) for key, name in (("report/plot", "plot"), ("report/tradeoff", "tradeoff"))
              if name in paths}
    if rows is not None:
        provenance = {g.label: describe([r.provenance for r in g.runs if r.status == "completed"]) for g in rows.groups}
    else:
        provenance = {table.label(run): describe([run.provenance]) for run in table.runs if run.status == "completed"}
    config = {"sweep_dir": str(Path(table.sweep_dir).resolve()), "metric": table.metric, "mode": table.mode,
              "rows": len(rows.groups) if rows is not None else len(table.runs),
              "baseline": rows.groups[rows.baseline].label if rows is not None else None,
              "best": (rows.groups[rows.best].label if rows is not None and rows.best is not None else None),
              "correction": getattr(rows.correction, "method", None) if rows is not None else None,
              "mixed_rows": result.get("mixed") or {}, "row_provenance": provenance}
    return {"tables": tables, "images": images, "identity": sweep_identity(table), "config": config}
