"""Plots of a sweep (matplotlib's ``Figure``, no pyplot, imported when plotting): bars per run, bars per row with
their t-intervals and a dot per seed, and the trade-off panels of a guidance sweep."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ..artifacts import atomic_write
from .display import display_name, fmt
from .read import override_dict
from .stats import CONFIDENCE, Aggregate, SweepTable, base_name, finite, metric_mode, sample_count

# a sweep over one of these (ddpm-eval -m experiment=guidance_sweep) also gets the trade-off plot
GUIDANCE_KEYS = ("guidance.scale", "guidance.cfg_scale", "guidance.autoguidance_scale")


def _save_figure(fig, path: str | Path) -> Path:
    """``fig`` at ``path`` (its suffix gives the format), written atomically."""
    path = Path(path)
    return atomic_write(path, lambda handle: fig.savefig(handle, dpi=120, format=path.suffix.lstrip(".") or "png"))


def plot(table: SweepTable, path: str | Path, metrics: Sequence[str] | None = None) -> Path:
    """Horizontal bars per run, one panel per metric (default: the ranking metric and the NLL estimate); the
    best run in a second colour, runs without a value labelled with their status."""
    from matplotlib.figure import Figure  # not pyplot: no GUI backend to choose, no global figure to close

    if metrics is None:
        metrics = [m for m in (table.metric, "val/vlb_bpd") if m]
        metrics = [m for i, m in enumerate(metrics) if m not in metrics[:i]
                   and any(finite(r.metrics.get(m)) for r in table.runs)]
    labels = [f"{run.job}: {table.label(run)}" if run.job is not None else table.label(run) for run in table.runs]
    height = 1.0 + 0.35 * len(table.runs)
    fig = Figure(figsize=(4.5 * max(len(metrics), 1) + 2.5, height))
    axes = fig.subplots(1, max(len(metrics), 1), sharey=True, squeeze=False)
    positions = list(range(len(table.runs)))[::-1]  # first job on top
    for ax, metric in zip(axes[0], metrics or [None], strict=False):
        values = [run.metrics.get(metric) if metric else None for run in table.runs]
        shown = [v for v in values if finite(v)]
        colors = ["tab:orange" if i == table.best and metric == table.metric else "tab:blue"
                  for i in range(len(values))]
        ax.barh(positions, [v if finite(v) else 0.0 for v in values], color=colors)
        for pos, value, run in zip(positions, values, table.runs, strict=True):
            text = fmt(value) if finite(value) else (run.status if run.status != "completed" else "n/a")
            ax.text(value if finite(value) else 0.0, pos, f" {text}", va="center", fontsize=8)
        if shown:
            ax.set_xlim(0, max(shown) * 1.25 if max(shown) > 0 else 1.0)
        title = display_name(metric) if metric else "no metric yet"
        if metric:
            title += f" ({'lower' if metric_mode(metric) == 'min' else 'higher'} is better)"
        ax.set_title(title, fontsize=10)
        ax.grid(axis="x", alpha=0.3)
    axes[0][0].set_yticks(positions)
    axes[0][0].set_yticklabels(labels, fontsize=8)
    fig.suptitle(table.sweep_dir.name, fontsize=10)
    fig.tight_layout()
    return _save_figure(fig, path)


def plot_rows(aggregate: Aggregate, path: str | Path, title: str = "", metrics: Sequence[str] | None = None) -> Path:
    """One panel per metric (default: the primary one and the NLL estimate): a bar per row at its mean with its
    t-interval as error bar (none for n=1), a dot per seed; the best row in a second colour."""
    from matplotlib.figure import Figure  # not pyplot: no GUI backend to choose, no global figure to close

    if metrics is None:
        metrics = [m for m in dict.fromkeys((aggregate.metric, "val/vlb_bpd"))
                   if m and any(m in g.stats for g in aggregate.groups)]
    groups = aggregate.groups
    labels = [(f"{g.label} (n={g.stats[aggregate.metric].n})" if aggregate.metric in g.stats else g.label)
              + (" ★" if i == aggregate.best else " ≈" if i in aggregate.tied else "") for i, g in enumerate(groups)]
    fig = Figure(figsize=(4.5 * max(len(metrics), 1) + 3, 1.0 + 0.4 * len(groups)))
    axes = fig.subplots(1, max(len(metrics), 1), sharey=True, squeeze=False)
    positions = list(range(len(groups)))[::-1]  # first row on top
    for ax, metric in zip(axes[0], metrics or [None], strict=False):
        for pos, i, group in zip(positions, range(len(groups)), groups, strict=True):
            stats = group.stats.get(metric) if metric else None
            if stats is None or stats.n == 0:
                ax.text(0.0, pos, " no value", va="center", fontsize=8)
                continue
            error = None if stats.half_width is None else [[stats.half_width], [stats.half_width]]
            color = "tab:orange" if i == aggregate.best and metric == aggregate.metric else "tab:blue"
            ax.barh([pos], [stats.mean], xerr=error, color=color, alpha=0.6, capsize=4)
            seeds = list(group.units[metric].values())
            ax.plot(seeds, [pos] * len(seeds), "k.", markersize=5)
        if metric:
            ax.set_title(f"{display_name(metric)} ({'lower' if metric_mode(metric) == 'min' else 'higher'} is "
                         f"better), mean ± {CONFIDENCE:.0%} CI", fontsize=9)
        ax.grid(axis="x", alpha=0.3)
    axes[0][0].set_yticks(positions)
    axes[0][0].set_yticklabels(labels, fontsize=8)
    fig.suptitle(f"{title}: dots = {aggregate.unit_kind}s; ★ best, ≈ tied with it", fontsize=10)
    fig.tight_layout()
    return _save_figure(fig, path)


def guidance_key(table: SweepTable) -> str | None:
    """The guidance scale the sweep varies (``guidance.scale`` / ``cfg_scale`` / ``autoguidance_scale``), if any."""
    return next((key for key in GUIDANCE_KEYS if key in table.varying), None)


def _metric_like(table: SweepTable, *names: str) -> str | None:
    """The first metric key (largest sample count) whose base name is one of ``names``, in that order."""
    keys = {k for run in table.runs for k, v in run.metrics.items() if finite(v)}
    for name in names:
        found = sorted((k for k in keys if base_name(k) == name), key=sample_count)
        if found:
            return found[-1]
    return None


def plot_tradeoff(table: SweepTable, path: str | Path, key: str, aggregate: Aggregate | None = None) -> Path:
    """The guidance trade-off in three panels, one point per completed run (with seed axes: per row, at its means
    over the seeds), joined in scale order and labelled with the scale: FID vs IS (fidelity vs diversity),
    precision vs recall, class accuracy vs scale."""
    from matplotlib.figure import Figure  # not pyplot: no GUI backend to choose, no global figure to close

    if aggregate is not None:
        sources = [(group.values, {m: s.mean for m, s in group.stats.items()}) for group in aggregate.groups]
    else:
        sources = [(override_dict(run.overrides), run.metrics) for run in table.runs if run.status == "completed"]
    points = []
    for values, metrics in sources:
        try:
            points.append((float(values[key]), metrics))
        except (KeyError, ValueError):
            continue
    points.sort(key=lambda p: p[0])
    panels = [(_metric_like(table, "is_mean", "is_clf_mean"), _metric_like(table, "fid")),
              (_metric_like(table, "recall"), _metric_like(table, "precision")),
              (key, _metric_like(table, "class_accuracy"))]
    fig = Figure(figsize=(14, 4.2))
    axes = fig.subplots(1, 3)
    for ax, (x_name, y_name) in zip(axes, panels, strict=True):
        pairs = [(scale, scale if x_name == key else metrics.get(x_name), metrics.get(y_name))
                 for scale, metrics in points]
        pairs = [(s, x, y) for s, x, y in pairs if finite(x) and finite(y)]
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
    fig.suptitle(f"{table.sweep_dir.name}: {key}" + (" (means over seeds)" if aggregate else ""), fontsize=10)
    fig.tight_layout()
    return _save_figure(fig, path)
