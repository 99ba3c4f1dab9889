"""Sweep reports: a Hydra multirun folder becomes one table (markdown + CSV) and a bar plot, like ADM's Table 1.

Each job folder (one with a ``.hydra/`` folder) is one row: its overrides (``.hydra/overrides.yaml``), the
``summary.json`` that ``ddpm-train`` writes at the end (status, parameter count, fit time, final metrics),
the end-of-training scores in ``metrics.json``, the ``results.json`` of a ``ddpm-eval`` job (its scores as
``eval/...``) and, for failed runs, the message of ``summary.json`` / ``error.txt``. A job folder with none
of these is still running, or ``incomplete`` when nothing in it has changed for ``stale_after_s`` (killed, out
of time). Plain Python: no torch or Lightning; matplotlib (Agg) only when plotting.
"""

from __future__ import annotations

import csv
import json
import math
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

SUMMARY_FILE = "summary.json"
METRICS_FILE = "metrics.json"
EVAL_RESULTS_FILE = "results.json"  # ddpm-eval
ERROR_FILE = "error.txt"
STATUSES = ("completed", "failed", "running", "incomplete")
MODES = ("min", "max")
# metrics where larger is better (by name without the stage prefix and the sample count)
HIGHER_IS_BETTER = ("is_mean", "is_clf_mean", "is", "precision", "recall", "acc", "accuracy", "class_accuracy")
# the columns of the markdown table, in this order (CSV has every metric)
TABLE_METRICS = ("fid", "sfid", "is_clf_mean", "is_mean", "precision", "recall", "kid_mean", "class_accuracy",
                 "vlb_bpd", "nll_bpd")
DISPLAY_NAMES = {"fid": "FID", "sfid": "sFID", "is_clf_mean": "IS_clf", "is_mean": "IS", "precision": "Prec",
                 "recall": "Rec", "kid_mean": "KID", "class_accuracy": "Acc", "vlb_bpd": "NLL bpd",
                 "nll_bpd": "NLL bpd (exact)"}
# a sweep over one of these (ddpm-eval -m experiment=guidance_sweep) also gets the trade-off plot
GUIDANCE_KEYS = ("guidance.scale", "guidance.cfg_scale")
# metric prefixes shown in the table: in-loop / end-of-training scores of ddpm-train, scores of ddpm-eval
TABLE_PREFIXES = ("val/", "eval/")
NOTES = {
    "fid": "FID/KID/Prec/Rec/IS@n: n EMA samples against the cached statistics of the data set's real images "
           "(not comparable with 50k-sample FIDs; small n biases FID upwards).",
    "class_accuracy": "Acc: the share of samples that the clean classifier (trained once per data set by the "
                      "metrics, not the guiding noisy classifier) assigns to the label they were sampled for.",
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
    """``["+loss_variant=a", "model=adm"]`` -> ``{"loss_variant": "a", "model": "adm"}``."""
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


def _job_number(folder: Path) -> int | None:
    try:
        hydra_cfg = yaml.safe_load((folder / ".hydra" / "hydra.yaml").read_text()) or {}
        return int(hydra_cfg["hydra"]["job"]["num"])
    except (OSError, KeyError, TypeError, ValueError, yaml.YAMLError):
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
    """Folders under ``sweep_dir`` that Hydra ran a job in (``sweep_dir`` itself for a single run)."""
    sweep_dir = Path(sweep_dir)
    found = []
    for marker in sorted(sweep_dir.rglob(".hydra")):
        folder = marker.parent
        relative = folder.relative_to(sweep_dir).parts
        if any(part.startswith(".") for part in relative):  # .submitit/, hidden folders
            continue
        if (marker / "overrides.yaml").is_file() or (marker / "config.yaml").is_file():
            found.append(folder)
    return found


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
    return sorted(runs, key=lambda r: (r.job is None, r.job if r.job is not None else 0, str(r.folder)))


# ---------------------------------------------------------------------------------------------- ranking
def base_name(metric: str) -> str:
    """``val/fid@200`` -> ``fid``; ``val/vlb_bpd`` -> ``vlb_bpd``."""
    return metric.rsplit("/", 1)[-1].split("@", 1)[0]


def metric_mode(metric: str) -> str:
    """``max`` for IS / precision / recall / accuracy, else ``min`` (FID, KID, bits/dim, losses)."""
    return "max" if base_name(metric) in HIGHER_IS_BETTER else "min"


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


def _status(table: SweepTable, index: int) -> str:
    run = table.runs[index]
    status = {"completed": "done"}.get(run.status, run.status)
    if index == table.best:
        status += " ★ best"
    if run.message:
        status += f": {run.message}"
    return _escape(status)


def to_markdown(table: SweepTable, title: str | None = None) -> str:
    """The report: a header (counts, common overrides, ranking, notes) and one table row per job."""
    counts = {s: sum(r.status == s for r in table.runs) for s in (*STATUSES, *(r.status for r in table.runs))}
    metrics = metric_columns(table)
    lines = [f"# {title or 'Sweep report: ' + table.sweep_dir.name}", "",
             f"`{table.sweep_dir}`: {len(table.runs)} runs: "
             + ", ".join(f"{n} {s}" for s, n in counts.items() if n) + "."]
    if table.common:
        lines.append("Common overrides: " + " ".join(f"`{o}`" for o in table.common) + ".")
    if table.metric and table.best is not None:
        better = "lower" if table.mode == "min" else "higher"
        lines.append(f"Ranked by `{table.metric}` ({better} is better); best: job {table.runs[table.best].job} "
                     f"(`{table.label(table.runs[table.best])}`), marked ★ (its value in bold).")
    elif table.metric:
        lines.append(f"Ranked by `{table.metric}`: no completed run has it yet.")
    optuna = _read_yaml(table.sweep_dir / "optimization_results.yaml")
    if isinstance(optuna, dict) and "best_value" in optuna:
        params = " ".join(f"`{k}={v}`" for k, v in (optuna.get("best_params") or {}).items())
        lines.append(f"Optuna: best value {optuna['best_value']} with {params}.")
    notes = [NOTES[key] for key in ("fid", "class_accuracy", "vlb_bpd") if any(base_name(m) == key for m in metrics)]
    notes.append("params: trainable parameters of the network (the EMA copy not counted); fit min: wall time of "
                 "`trainer.fit` (training, validation and the end-of-training sampling and scoring).")
    lines += ["", *(f"- {note}" for note in notes), ""]
    head = ["job", *(table.varying or ["run"]), "status", "params", "steps", "fit min", *map(display_name, metrics)]
    lines += ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * len(head)) + "|"]
    for i, run in enumerate(table.runs):
        values = _override_dict(run.overrides)
        label = [_escape(values.get(k, "")) for k in table.varying] or [_escape(table.label(run))]
        cells = []
        for metric in metrics:
            text = _fmt(run.metrics.get(metric))
            cells.append(f"**{text}**" if i == table.best and metric == table.metric and text else text)
        minutes = "" if run.train_seconds is None else f"{run.train_seconds / 60:.1f}"
        row = [str(run.job if run.job is not None else ""), *label, _status(table, i), _params(run.num_parameters),
               "" if run.global_step is None else str(run.global_step), minutes, *cells]
        if i == table.best:
            row[1:1 + len(label)] = [f"**{cell}**" for cell in row[1:1 + len(label)]]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def write_csv(table: SweepTable, path: str | Path) -> Path:
    """Every run with every scalar metric (one column each), its overrides and status; ``best`` is 1 or 0."""
    path = Path(path)
    metrics = sorted({k for run in table.runs for k in run.metrics})
    columns = ["job", "label", *table.varying, "status", "best", "message", "num_parameters", "train_seconds",
               "global_step", *metrics, "overrides", "folder"]
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for i, run in enumerate(table.runs):
            values = _override_dict(run.overrides)
            writer.writerow({"job": run.job, "label": table.label(run), **{k: values.get(k, "") for k in table.varying},
                             "status": run.status, "best": int(i == table.best), "message": run.message or "",
                             "num_parameters": run.num_parameters, "train_seconds": run.train_seconds,
                             "global_step": run.global_step, **{k: run.metrics.get(k, "") for k in metrics},
                             "overrides": " ".join(run.overrides), "folder": str(run.folder)})
    return path


def plot(table: SweepTable, path: str | Path, metrics: Sequence[str] | None = None) -> Path:
    """Horizontal bars per run, one panel per metric (default: the ranking metric and the NLL estimate); the
    best run in a second colour, runs without a value labelled with their status."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if metrics is None:
        metrics = [m for m in (table.metric, "val/vlb_bpd") if m]
        metrics = [m for i, m in enumerate(metrics) if m not in metrics[:i]
                   and any(_finite(r.metrics.get(m)) for r in table.runs)]
    labels = [f"{run.job}: {table.label(run)}" if run.job is not None else table.label(run) for run in table.runs]
    height = 1.0 + 0.35 * len(table.runs)
    fig, axes = plt.subplots(1, max(len(metrics), 1), figsize=(4.5 * max(len(metrics), 1) + 2.5, height),
                             sharey=True, squeeze=False)
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
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


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


def plot_tradeoff(table: SweepTable, path: str | Path, key: str) -> Path:
    """The guidance trade-off in three panels, one point per completed run, joined in scale order and labelled
    with the scale: FID vs IS (fidelity vs diversity), precision vs recall, class accuracy vs scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = []
    for run in table.runs:
        try:
            scale = float(_override_dict(run.overrides)[key])
        except (KeyError, ValueError):
            continue
        if run.status == "completed":
            points.append((scale, run.metrics))
    points.sort(key=lambda p: p[0])
    panels = [(_metric_like(table, "is_mean", "is_clf_mean"), _metric_like(table, "fid")),
              (_metric_like(table, "recall"), _metric_like(table, "precision")),
              (key, _metric_like(table, "class_accuracy"))]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
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
    fig.suptitle(f"{table.sweep_dir.name}: {key}", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(sweep_dir: str | Path, out_dir: str | Path | None = None, metric: str | None = None,
                 mode: str | None = None, stale_after_s: float = 3600.0, make_plot: bool = True,
                 title: str | None = None) -> dict[str, Any]:
    """``report.md``, ``report.csv`` and ``report.png`` for ``sweep_dir`` in ``out_dir`` (default: the sweep)."""
    table = build_table(collect_runs(sweep_dir, stale_after_s), sweep_dir, metric=metric, mode=mode)
    out_dir = Path(out_dir) if out_dir is not None else Path(sweep_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    markdown = to_markdown(table, title)
    (out_dir / "report.md").write_text(markdown)
    paths = {"markdown": out_dir / "report.md", "csv": write_csv(table, out_dir / "report.csv")}
    if make_plot:
        paths["plot"] = plot(table, out_dir / "report.png")
        key = guidance_key(table)
        if key is not None:
            paths["tradeoff"] = plot_tradeoff(table, out_dir / "report_tradeoff.png", key)
    return {"table": table, "markdown": markdown, "paths": paths}
