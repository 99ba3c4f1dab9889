"""A checkpoint series (``ddpm-eval -m ckpts=<run> sample.seed=0,1,2``) against training step: one panel per
metric, the mean over seeds as a line and its t-interval as a band (one job: its values as a line)."""

from __future__ import annotations

from pathlib import Path

from .display import display_name
from .plots import _save_figure
from .read import override_dict
from .stats import CONFIDENCE, Aggregate, SweepTable, finite, metric_mode
from .tables import metric_columns

STEP_KEY = "ckpt_step"  # the override a series' records carry (``read.read_series``): the x axis


def is_series(table: SweepTable) -> bool:
    """Whether ``table``'s rows are checkpoints of a series at several training steps."""
    return STEP_KEY in table.varying


def step_points(table: SweepTable, aggregate: Aggregate | None, metric: str) -> list[tuple[int, float, float | None]]:
    """(step, value, half-width of its interval or None) per checkpoint, in step order: the means over seeds of
    ``aggregate``'s rows, else each completed run's value."""
    points = []
    if aggregate is not None:
        for group in aggregate.groups:
            stats = group.stats.get(metric)
            if STEP_KEY in group.values and stats is not None and stats.n and finite(stats.mean):
                points.append((int(group.values[STEP_KEY]), stats.mean, stats.half_width))
    else:
        for run in table.runs:
            step = override_dict(run.overrides).get(STEP_KEY)
            if step is not None and finite(run.metrics.get(metric)):
                points.append((int(step), run.metrics[metric], None))
    return sorted(points)


def plot_steps(table: SweepTable, aggregate: Aggregate | None, path: str | Path) -> Path:
    """Every metric against training step (``report_steps.png``), seed intervals as bands."""
    from matplotlib.figure import Figure  # not pyplot: no GUI backend to choose, no global figure to close

    metrics = [m for m in metric_columns(table) if step_points(table, aggregate, m)]
    columns = min(3, max(len(metrics), 1))
    rows = -(-max(len(metrics), 1) // columns)
    fig = Figure(figsize=(4.8 * columns, 3.4 * rows))
    axes = fig.subplots(rows, columns, squeeze=False).ravel()
    for ax, metric in zip(axes, metrics, strict=False):
        points = step_points(table, aggregate, metric)
        steps, means = [p[0] for p in points], [p[1] for p in points]
        ax.plot(steps, means, "o-", color="tab:blue", markersize=4)
        if any(p[2] is not None for p in points):
            widths = [p[2] or 0.0 for p in points]
            ax.fill_between(steps, [m - w for m, w in zip(means, widths, strict=True)],
                            [m + w for m, w in zip(means, widths, strict=True)], color="tab:blue", alpha=0.2)
        ax.set_title(f"{display_name(metric)} ({'lower' if metric_mode(metric) == 'min' else 'higher'} is better)",
                     fontsize=9)
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
    for ax in axes[len(metrics):]:
        ax.set_visible(False)
    band = f"mean over {aggregate.unit_kind}s, band: {CONFIDENCE:.0%} CI" if aggregate is not None else "one seed"
    fig.suptitle(f"{table.sweep_dir.name}: metrics vs training step ({band})", fontsize=10)
    fig.tight_layout()
    return _save_figure(fig, path)


def series_expected(table: SweepTable, expected: list[dict[str, str]] | None) -> list[dict[str, str]] | None:
    """The jobs a sweep launches (``read.expected_jobs``), for a series one per job and checkpoint step (its jobs
    score every step), so the aggregated rows count their seeds per step."""
    if expected is None or not is_series(table):
        return expected
    steps = list(dict.fromkeys(override_dict(run.overrides)[STEP_KEY] for run in table.runs
                               if STEP_KEY in override_dict(run.overrides)))
    return [{**job, STEP_KEY: step} for job in expected for step in steps]
