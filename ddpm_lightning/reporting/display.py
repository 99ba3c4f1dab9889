"""How metrics and values are shown in the tables and plots: display names from ``config/choices.py``, arrows for
the direction, numbers to 3-4 significant digits."""

from __future__ import annotations

from ..config.choices import DISPLAY_NAMES
from .stats import base_name, finite, metric_mode


def display_name(metric: str) -> str:
    """``val/fid@200`` -> ``FID@200`` (``config.choices.DISPLAY_NAMES``); a name without one is shown as it is."""
    name = DISPLAY_NAMES.get(base_name(metric))
    if name is None:
        return metric
    return f"{name}@{metric.rsplit('@', 1)[1]}" if "@" in metric else name


def fmt(value: float | None) -> str:
    """A value with 3-4 significant digits (``""`` for None)."""
    if value is None:
        return ""
    if not finite(value):
        return str(value)
    if value != 0 and abs(value) < 0.01:
        return f"{value:.3g}"
    decimals = 3 if abs(value) < 10 else 2 if abs(value) < 100 else 1 if abs(value) < 1000 else 0
    return f"{value:.{decimals}f}"


def arrow(metric: str) -> str:
    """``↑`` when higher is better, ``↓`` when lower is."""
    return "↑" if metric_mode(metric) == "max" else "↓"
