"""Read back what W&B wrote: the records of offline runs (``<dir>/wandb/offline-run-*/run-<id>.wandb``), never a mock.

A ``.wandb`` file is W&B's transaction log: a 7-byte header (``:W&B``, magic, version), then LevelDB-log records
(32 KiB blocks; each chunk a 7-byte header: crc32, length, type full/first/middle/last) holding serialized
``wandb_internal_pb2.Record`` protobufs, which ``wandb`` itself ships.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wandb.proto import wandb_internal_pb2

BLOCK = 32 * 1024
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def raw_records(path: str | Path) -> list[bytes]:
    data = Path(path).read_bytes()
    ident, _, _ = struct.unpack("<4sHB", data[:HEADER])
    assert ident == b":W&B", f"{path} is not a W&B transaction log"
    records, pending, pos = [], b"", HEADER
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # the rest of a block too short for a chunk header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        chunk = data[pos + HEADER:pos + HEADER + length]
        pos += HEADER + length
        if kind == FULL:
            records.append(chunk)
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind == LAST:
            records.append(pending + chunk)
            pending = b""
    return records


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)


@dataclass
class Segment:
    """One offline run folder: one process's part of a W&B run."""

    folder: Path
    run_id: str = ""
    group: str = ""
    job_type: str = ""
    name: str = ""
    tags: list[str] = field(default_factory=list)
    start: float = 0.0
    config: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)

    def media(self, path: str) -> Path:
        return self.folder / "files" / path


def read_segment(folder: str | Path) -> Segment:
    folder = Path(folder)
    (log,) = folder.glob("run-*.wandb")
    segment = Segment(folder)
    for raw in raw_records(log):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = record.run
            segment.run_id, segment.group, segment.job_type = run.run_id, run.run_group, run.job_type
            segment.name, segment.tags = run.display_name, list(run.tags)
            segment.start = run.start_time.ToMicroseconds() / 1e6
            segment.config.update({_key(i): json.loads(i.value_json) for i in run.config.update})
        elif kind == "config":
            segment.config.update({_key(i): json.loads(i.value_json) for i in record.config.update})
        elif kind == "history":
            segment.history.append({_key(i): json.loads(i.value_json) for i in record.history.item})
        elif kind == "summary":
            segment.summary.update({_key(i): json.loads(i.value_json) for i in record.summary.update})
        elif kind == "files":
            segment.files += [f.path for f in record.files.files]
    return segment


def read_runs(save_dir: str | Path) -> list[Segment]:
    """Every offline run segment under ``<save_dir>/wandb``, in start order. A run finished in this process may still
    be written by this process's W&B service: ``wandb.teardown()`` waits for it first."""
    import wandb

    wandb.teardown()
    folders = sorted(Path(save_dir, "wandb").glob("offline-run-*"))
    return sorted((read_segment(f) for f in folders), key=lambda s: s.start)


MEDIA_SUFFIXES = ("/_type", "/filenames", "/count", "/width", "/height", "/format", "/captions", "/caption", "/sha256",
                  "/size", "/path", "/ncols", "/nrows", "/artifact_path", "/_latest_artifact_path", "/log_mode")


def metric_of(key: str) -> str:
    """A media value is logged as several nested keys (``samples/grid/_type``, ``.../filenames``): its metric."""
    for suffix in MEDIA_SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)]
    return key


def steps_per_key(segments: list[Segment], axis: str = "trainer/global_step") -> dict[str, list[int]]:
    """Each logged metric's ``axis`` values across ``segments``, in the order they were logged."""
    steps: dict[str, list[int]] = {}
    for segment in segments:
        for row in segment.history:
            if axis not in row:
                continue
            for metric in dict.fromkeys(metric_of(k) for k in row if not k.startswith("_") and k != axis):
                steps.setdefault(metric, []).append(int(row[axis]))
    return steps
