"""Crash-safe checkpoint writing: Lightning's checkpoint saves go through ``artifacts.atomic_torch_save``.

Why a CheckpointIO of our own: Lightning 2.6's ``TorchCheckpointIO`` saves through
``lightning.fabric.utilities.cloud_io._atomic_save``, an fsspec transaction whose local implementation writes
a temporary file from ``tempfile.mkstemp()`` (the system temp folder) and commits it with ``shutil.move``.
That is only atomic when the temp folder and the run folder share a file system; otherwise ``shutil.move``
copies into the final name and a kill during the copy leaves a truncated checkpoint. Killed runs also leave
checkpoint-sized files in ``/tmp``, and nothing is fsync'ed. ``AtomicCheckpointIO`` writes (``artifacts``)
``.<name>.tmp-<pid>`` next to the target, fsyncs it, ``os.replace``s it onto the target (atomic on POSIX
within a folder) and fsyncs the folder. Remote paths (``s3://``, ...) keep Lightning's behaviour.

Reading, validating and resuming from checkpoints is ``modules/checkpoint.py``'s.
"""

from __future__ import annotations

from typing import Any

from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import get_filesystem
from typing_extensions import override

from ..artifacts import atomic_torch_save


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local saves go through ``atomic_torch_save`` (see the module docstring).

    Wired as a trainer plugin (``conf/trainer/default.yaml``: ``plugins``); loading is Lightning's.
    """

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None or type(get_filesystem(path)).__name__ != "LocalFileSystem":
            super().save_checkpoint(checkpoint, path, storage_options=storage_options)
            return
        atomic_torch_save(checkpoint, path)
