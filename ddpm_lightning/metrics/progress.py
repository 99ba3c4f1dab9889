"""Progress of a long pass as log lines (they read the same in a terminal, a SLURM log and ``train.log``).

``ProgressLines(total, what, log)``: after the first ``update`` one ``estimated time:`` line timed on it, then a
line at every tenth of the work (and at its end) with the count, the rate and the time left.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def format_duration(seconds: float) -> str:
    """``1h02m03s``, ``2m05s`` or ``7s``."""
    seconds = int(round(max(seconds, 0.0)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class ProgressLines:
    """Log lines for ``total`` units (``unit``, e.g. "samples") of ``what``: the estimate after the first
    ``update``, then ``what: done/total unit (rate unit/s, ETA ...)`` at every ``every`` fraction and at the end."""

    def __init__(self, total: int, what: str, log: Callable[[str], Any], unit: str = "samples",
                 every: float = 0.1) -> None:
        self.total, self.what, self.log, self.unit = int(total), what, log, unit
        self.step = max(1, int(self.total * every))
        self.done, self._next = 0, self.step
        self._start = time.perf_counter()

    def update(self, n: int) -> None:
        first = self.done == 0
        self.done += int(n)
        seconds = max(time.perf_counter() - self._start, 1e-9)
        rate = self.done / seconds
        if first and self.done < self.total:
            self.log(f"{self.what}: estimated time ~{seconds / self.done * self.total / 60:.1f} min for "
                     f"{self.total} {self.unit} (the first {self.done} took {seconds:.1f} s)")
        if self.done >= self._next or self.done >= self.total:
            self._next = (self.done // self.step + 1) * self.step
            self.log(f"{self.what}: {self.done}/{self.total} {self.unit} ({rate:.2f} {self.unit}/s, "
                     f"ETA {format_duration((self.total - self.done) / rate)})")
