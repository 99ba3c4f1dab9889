"""How metrics and values are shown in the tables and plots: display names from ``config/choices.py``, arrows for
the direction, numbers to 3-4 significant digits, a mean with its interval to the interval's precision."""

from __future__ import annotations

import math

from ..config.choices import DISPLAY_NAMES
from .stats import Paired, Stats, base_name, finite, metric_mode


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


def signed(value: float | None, decimals: int | None = None) -> str:
    """A difference with its sign (``+1.5``), to ``decimals`` places when given."""
    text = fmt(value) if decimals is None or not finite(value) else f"{value:.{decimals}f}"
    return f"+{text}" if finite(value) and value > 0 else text


def decimals_for(half_width: float | None) -> int | None:
    """Decimals that show an interval's half-width to two significant digits (None: no interval or width 0)."""
    if not finite(half_width) or half_width <= 0:
        return None
    return min(max(0, 1 - math.floor(math.log10(half_width))), 8)


def fmt_with(value: float | None, decimals: int | None) -> str:
    """``value`` to ``decimals`` places (``fmt`` when None)."""
    return fmt(value) if decimals is None or not finite(value) else f"{value:.{decimals}f}"


def stats_cell(stats: Stats | None, within: float | None = None) -> str:
    """``mean ± half-width (sd ...)`` to the interval's precision; ``value (n=1)`` for one seed."""
    if stats is None or stats.n == 0:
        return ""
    if stats.n == 1:
        text, spread = fmt(stats.mean), ["n=1"]
    else:
        places = decimals_for(stats.half_width)
        text = f"{fmt_with(stats.mean, places)} ± {fmt_with(stats.half_width, places)}"
        spread = [f"sd {fmt_with(stats.std, places)}"]
    if within is not None:
        spread.append(f"sampling sd {fmt(within)}")
    return f"{text} ({'; '.join(spread)})"


def paired_cell(paired: Paired | None) -> str:
    """A paired difference: ``+1.5 [+0.2, +2.8] **worse**`` (``†``: made inconclusive by the correction)."""
    if paired is None or paired.diff.n == 0:
        return "no shared seeds"
    if paired.diff.n == 1:
        return f"{signed(paired.diff.mean)} (1 pair: no interval) {paired.verdict}"
    places = decimals_for(paired.diff.half_width)
    text = (f"{signed(paired.diff.mean, places)} [{signed(paired.diff.low, places)}, "
            f"{signed(paired.diff.high, places)}]")
    if paired.verdict != "inconclusive":
        return f"{text} **{paired.verdict}**"
    return f"{text} inconclusive" + ("†" if paired.demoted else "")
