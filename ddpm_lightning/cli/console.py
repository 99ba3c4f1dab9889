"""One console line per event: what a run prints is read hundreds of times.

``quiet_console()`` runs where work starts (``ddpm-train``, ``ddpm-sample``, ``ddpm-eval``), once Lightning is
imported:

* one handler per record: the ``lightning`` package attaches its own ``StreamHandler`` ("INFO: ...") to the
  ``lightning`` logger, whose records also reach the root logger that Hydra's ``job_logging`` configured
  ("[time][INFO] ...", and ``train.log``); where the root logger has handlers, Lightning's own is removed;
* third-party lines a user cannot act on are dropped by message (``logging.Filter`` on the handlers that print:
  Lightning's "litlogger" tip), and so are the warnings of that kind (``warnings.filterwarnings`` by message:
  the model summary's precision note, torch's ``LeafSpec`` deprecation inside Lightning, the note that a resumed
  run's checkpoint folder is not empty). Everything else, warnings included, is printed as before.
"""

from __future__ import annotations

import logging
import re
import sys
import warnings

# log records of third-party libraries that no setting of ours changes (matched against the message)
DROPPED_RECORDS = (
    r"Tip: For seamless cloud logging and experiment tracking, try installing \[litlogger\]",
    r"Trainer already configured with model summary callbacks",  # ours is the one-line summary: nothing to do
)
# warnings by message: raised inside Lightning / torch, about their own internals or an expected state
IGNORED_WARNINGS = (
    r"Precision .* is not supported by the model summary",  # the summary's size estimate in mixed precision
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",  # torch's deprecation, raised by Lightning's _pytree
    r"Checkpoint directory .* exists and is not empty",  # resume=auto continues into its own checkpoints
)


class DropMessages(logging.Filter):
    """Drops the records whose message matches one of ``patterns`` (``re.search``)."""

    def __init__(self, patterns: tuple[str, ...] = DROPPED_RECORDS) -> None:
        super().__init__()
        self.patterns = [re.compile(p) for p in patterns]

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(p.search(message) for p in self.patterns)


def _prints(handler: logging.Handler) -> bool:
    """Whether ``handler`` writes to the console (a stream handler on stdout or stderr, not a file or a buffer)."""
    streams = (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__)
    return isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler) \
        and getattr(handler, "stream", None) in streams


def quiet_console() -> None:
    """One handler per record, third-party tips and internal warnings dropped by message (idempotent)."""
    import lightning  # noqa: F401  its import attaches the handler handled here

    root = logging.getLogger()
    package = logging.getLogger("lightning")
    if any(_prints(handler) for handler in root.handlers):  # Hydra's job logging prints (and files) every record:
        for handler in list(package.handlers):  # Lightning's own handler would print each one a second time
            if type(handler) is logging.StreamHandler:
                package.removeHandler(handler)
    for name in ("", "lightning", "lightning.pytorch", "lightning.fabric"):
        for handler in logging.getLogger(name).handlers:
            if not any(isinstance(f, DropMessages) for f in handler.filters):
                handler.addFilter(DropMessages())
    for pattern in IGNORED_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
