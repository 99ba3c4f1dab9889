"""Generation streamed to disk in shards, shared by processes, resumable: the owner of a run's sample files.

Layout of ``<output_dir>`` (``ddpm-sample`` and ``ddpm-eval``)::

    shards/run.json               the generation settings; a rerun with other settings is refused
    shards/<start>-<end>.npz      samples start..end-1 (global indices): arr_0 uint8 NHWC in the data's
                                  channels, arr_1 labels, and, when scored, their per-sample features
                                  (f_pool, f_spatial, f_clf_logits, ...) with feature_id
    shards/<start>-<end>.json     {"seconds": generating them}, over every run that made a part of them: a rerun
                                  that keeps finished shards still reports the whole job's sampling time
    samples.npz                   every sample in the ADM evaluator's layout (uint8 NHWC, 3 channels: 1-channel
                                  data repeated; labels in arr_1), streamed from the shards
    grid.png                      the first 100 samples

Shard ``k`` holds the indices ``[k * shard_size, (k + 1) * shard_size)``; process ``r`` of ``w`` generates the
shards with ``k % w == r``. Per-sample seeds (``sample_images(seed=, first_index=)``: image i and its label
depend on (seed, i) only) make the files identical for any process count, batch size or interruption. A
shard is written atomically once finished, so Ctrl-C, SIGTERM or a full disk keep every finished shard; Ctrl-C
and SIGTERM also keep the finished batches of the shard in progress (``<start>-<upto>.partial.npz``, whatever
``shard_size``), and rerunning the same command into the same folder (``hydra.run.dir=<folder>``) generates only
the rest, from the next batch on: the same batches, so the same bytes as an uninterrupted run.
Only features travel to rank 0 (through the shard files); it scores them in index order, so the metrics
are identical for any process count too.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import artifacts
from ..metrics import to_uint8, write_npz
from ..sampling import save_grid

SHARD_NAME = re.compile(r"^(\d{9})-(\d{9})\.npz$")
PARTIAL_NAME = re.compile(r"^(\d{9})-(\d{9})\.partial\.npz$")  # the first samples of an interrupted shard
FEATURE_PREFIX = "f_"
# per-sample feature bytes when scoring with the FID Inception (pool 2048 + spatial 2023 + logits 1008 + slack)
INCEPTION_FEATURE_BYTES = 4 * (2048 + 2023 + 1008 + 16)


NoSpaceLeft = artifacts.NoSpaceLeft  # a full disk while writing: the finished shards are kept


@dataclass
class Processes:
    """This process's place among the generating processes (one, or Lightning Fabric's DDP group)."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    fabric: Any = None

    saved_env: dict[str, str | None] | None = None  # what launch() changed in os.environ (the starting process)

    def barrier(self) -> None:
        if self.fabric is not None:
            self.fabric.barrier()

    def close(self, wait_s: float = 120.0) -> None:
        """End the process group (and, in the process that started the others, wait for them and restore the
        environment), so that the next job of a Hydra multirun starts its own processes."""
        if self.fabric is None:
            return
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        launcher = getattr(self.fabric.strategy, "launcher", None)
        deadline = time.monotonic() + wait_s
        for child in getattr(launcher, "procs", []):
            try:
                child.wait(timeout=max(0.0, deadline - time.monotonic()))
            except Exception:  # noqa: BLE001 - a stuck child must not keep the sweep waiting
                child.kill()
        if self.saved_env is not None:
            for key, value in self.saved_env.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
        self.fabric = None


_ACTIVE: list[Processes] = []
_LAUNCH_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")


def launch(devices: int, device: torch.device) -> Processes:
    """One process, or ``devices`` processes started by Lightning Fabric (``strategy="ddp"``; gloo on CPU).

    Under ``torchrun`` (``LOCAL_WORLD_SIZE`` set) the processes already exist: Fabric joins them, whatever
    ``devices`` says. Rank 0 is the process the user started. Inside a Hydra multirun (``-m``) the other
    processes run this job alone (its overrides, its folder), not the sweep again; ``close_processes`` (called
    when the run ends) ends them, so that the next job starts its own.
    """
    if int(devices) < 1:
        raise ValueError(f"devices must be >= 1, got {devices}")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if int(devices) == 1 and world == 1:
        return Processes(device=device)
    if world == 1 and "LOCAL_WORLD_SIZE" not in os.environ:  # before any process starts: no more than can work
        from .validate import process_count_error, usable_cpus

        error = process_count_error(int(devices), cpus=usable_cpus() if device.type == "cpu" else None,
                                    gpus=torch.cuda.device_count() if device.type == "cuda" else None)
        if error:
            raise ValueError(error)
    from lightning.fabric import Fabric

    num_nodes = 1
    # the process the user started (not torchrun's, not one Fabric started: those have WORLD_SIZE > 1); what an
    # earlier one-process Lightning run in this process left in the environment (LOCAL_RANK=0, WORLD_SIZE=1, a
    # closed MASTER_PORT) would make Fabric wait for processes nobody starts: cleared, restored by close()
    starter = world <= 1 and "LOCAL_WORLD_SIZE" not in os.environ
    saved = {key: os.environ.get(key) for key in _LAUNCH_ENV} if starter else None
    if starter:
        for key in _LAUNCH_ENV:
            os.environ.pop(key, None)
    if "LOCAL_WORLD_SIZE" in os.environ:  # torchrun
        devices = int(os.environ["LOCAL_WORLD_SIZE"])
        num_nodes = max(1, world // devices)
    accelerator = "cuda" if device.type == "cuda" else "cpu"
    fabric = Fabric(accelerator=accelerator, devices=int(devices), num_nodes=num_nodes, strategy="ddp")
    with _multirun_job_command():
        fabric.launch()
    procs = Processes(rank=fabric.global_rank, world_size=fabric.world_size, device=fabric.device, fabric=fabric,
                      saved_env=saved)
    _ACTIVE.append(procs)
    return procs


def close_processes() -> None:
    """``Processes.close`` for every group ``launch`` started in this process."""
    while _ACTIVE:
        _ACTIVE.pop().close()


@contextmanager
def _multirun_job_command() -> Iterator[None]:
    """While Fabric starts the other ranks of a Hydra multirun job: the command line it re-runs is this job's
    (its overrides, run mode, its folder as ``hydra.run.dir``) instead of the whole sweep's ``-m`` line."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode
        from omegaconf import OmegaConf, open_dict, read_write
    except ImportError:  # pragma: no cover - hydra is a dependency
        yield
        return
    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        yield
        return
    hydra_cfg = HydraConfig.get()
    argv, run_dir = sys.argv, hydra_cfg.run.dir
    sys.argv = [sys.argv[0], *OmegaConf.to_container(hydra_cfg.overrides.task, resolve=False)]  # as typed
    with read_write(hydra_cfg), open_dict(hydra_cfg):
        hydra_cfg.run.dir = hydra_cfg.runtime.output_dir
    try:
        yield
    finally:
        sys.argv = argv
        with read_write(hydra_cfg), open_dict(hydra_cfg):
            hydra_cfg.run.dir = run_dir


# ------------------------------------------------------------------------------------------- the files
def shard_path(shards: Path, start: int, end: int) -> Path:
    return shards / f"{start:09d}-{end:09d}.npz"


def partial_path(shards: Path, start: int, upto: int) -> Path:
    return shards / f"{start:09d}-{upto:09d}.partial.npz"


def partial_shard(shards: Path, start: int, end: int) -> tuple[int, Path] | None:
    """(upto, path) of the interrupted part of shard ``start..end-1`` (samples ``start..upto-1``), or None."""
    found = [(int(m.group(2)), p) for p in shards.glob(f"{start:09d}-*.partial.npz")
             if (m := PARTIAL_NAME.match(p.name)) and start < int(m.group(2)) < end]
    return max(found) if found else None


def shard_ranges(num_samples: int, shard_size: int) -> list[tuple[int, int]]:
    return [(s, min(s + shard_size, num_samples)) for s in range(0, num_samples, shard_size)]


def finished(shards: Path, num_samples: int, shard_size: int) -> list[tuple[int, int]]:
    return [r for r in shard_ranges(num_samples, shard_size) if shard_path(shards, *r).is_file()]


def check_settings(shards: Path, settings: dict[str, Any], rank: int) -> None:
    """Record the settings (rank 0) or refuse shards made with other ones (a rerun into the same folder)."""
    path = shards / "run.json"
    wanted = json.loads(json.dumps(settings, default=str))
    if path.is_file():
        have = json.loads(path.read_text())
        differ = sorted(k for k in set(have) | set(wanted) if have.get(k) != wanted.get(k))
        if differ:
            raise ValueError(f"{shards} holds samples generated with other settings ({', '.join(differ)}: "
                             f"{', '.join(f'{have.get(k)!r} there, {wanted.get(k)!r} now' for k in differ)}); "
                             f"use another output folder or the same settings")
    elif rank == 0:
        artifacts.write_text(path, json.dumps(wanted, indent=2))


def write_shard(path: Path, images: np.ndarray, labels: np.ndarray | None, features: dict[str, torch.Tensor],
                feature_id: str) -> None:
    arrays: dict[str, np.ndarray] = {"arr_0": images}
    if labels is not None:
        arrays["arr_1"] = labels.astype(np.int64)
    if features:
        arrays |= {FEATURE_PREFIX + k: v.numpy() for k, v in features.items()}
        arrays["feature_id"] = np.str_(feature_id)

    try:
        artifacts.atomic_write(path, lambda handle: np.savez(handle, **arrays))
    except NoSpaceLeft:  # named by its folder: the message goes on to count the shards kept there
        raise NoSpaceLeft(path.parent) from None


def seconds_path(path: Path) -> Path:
    """The timing sidecar of a shard or partial file (``<name>.json`` beside ``<name>.npz``)."""
    return path.with_suffix(".json")


def write_seconds(path: Path, seconds: float | None) -> None:
    """Before the shard itself, so a shard never exists beside another's time; None (a part made before the
    sidecars) removes a stale one."""
    if seconds is None:
        seconds_path(path).unlink(missing_ok=True)
    else:
        artifacts.write_text(seconds_path(path), json.dumps({"seconds": float(seconds)}))


def read_seconds(path: Path) -> float | None:
    """The recorded generation seconds of a shard or partial file; None for files written before sidecars."""
    try:
        return float(json.loads(seconds_path(path).read_text())["seconds"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def read_shard(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


# ---------------------------------------------------------------------------------------- the budget
def check_disk(out_dir: Path, num_samples: int, done: int, shape: tuple[int, int, int], scored: bool) -> dict:
    """Refuse up front what the disk cannot hold: the shards of the samples still to generate (+ features when
    scored) and the 3-channel ``samples.npz`` of all of them."""
    c, h, w = shape
    per_sample = c * h * w + (INCEPTION_FEATURE_BYTES if scored else 0)
    need = (num_samples - done) * per_sample + num_samples * 3 * h * w
    out_dir.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(out_dir).free
    if need > free:
        raise ValueError(f"num_samples={num_samples} needs ~{_size(need)} of disk in {out_dir} "
                         f"({per_sample} bytes per sample in shards + {3 * h * w} in samples.npz), "
                         f"only {_size(free)} free: lower num_samples or free space")
    return {"disk_needed_bytes": need, "disk_free_bytes": free}


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


# ------------------------------------------------------------------------------------ interruption
@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM (SLURM preemption, ``kill``) stops generation like Ctrl-C: finished shards stay."""
    def handler(signum, frame):
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# ------------------------------------------------------------------------------------- generation
def generate_shards(sample_fn: Callable[[int, int], tuple[torch.Tensor, torch.Tensor | None]], *,
                    shards: Path, num_samples: int, shard_size: int, batch_size: int, procs: Processes,
                    score_fn: Callable[[torch.Tensor], dict[str, torch.Tensor]] | None = None,
                    feature_id: str = "", log: Callable[[str], None] | None = None,
                    calls_per_batch: int | None = None) -> dict[str, float]:
    """Generate this process's missing shards: ``sample_fn(n, first_index)`` -> (images in [-1, 1], labels).

    ``score_fn(uint8 batch)`` gives the per-sample features stored with each shard. Before the loop a line
    gives the work (batches x ``calls_per_batch`` network calls); after the first batch, ``estimated time:``
    from its timing; then progress lines show samples/s and the ETA of this process's part. Returns counts
    and timing.
    """
    log = log or (lambda text: print(text, file=sys.stderr, flush=True))
    mine = [r for k, r in enumerate(shard_ranges(num_samples, shard_size)) if k % procs.world_size == procs.rank]
    todo = [r for r in mine if not shard_path(shards, *r).is_file()]
    for r in set(mine) - set(todo):  # a partial file left by a kill between a shard's write and its removal
        if (stale := partial_shard(shards, *r)) is not None:
            stale[1].unlink(missing_ok=True)
            seconds_path(stale[1]).unlink(missing_ok=True)
    kept = [read_seconds(shard_path(shards, *r)) for r in mine if r not in todo]
    begun = {r: partial_shard(shards, *r) for r in todo}  # shards an interrupted run began: from the next batch on
    total = sum(end - (begun[(start, end)] or (start,))[0] for start, end in todo)
    batches = sum(-(-(end - (begun[(start, end)] or (start,))[0]) // batch_size) for start, end in todo)
    calls = None if calls_per_batch is None else batches * calls_per_batch
    if total:
        log(f"[rank {procs.rank}/{procs.world_size}] generating {total} samples ({sum(e - s for s, e in mine) - total} "
            f"kept from an earlier run): {batches} batch{'' if batches == 1 else 'es'} of <= "
            f"{min(batch_size, shard_size)}"
            + ("" if calls is None else f" x {calls_per_batch} network calls = {calls} network calls"))
    done, start_time, timed = 0, time.perf_counter(), False
    for start, end in todo:
        part = _Part(start, begun[(start, end)], score_fn, batch_size, feature_id)
        part_start = time.perf_counter()
        try:
            for first in range(part.upto, end, batch_size):
                x, y = sample_fn(min(batch_size, end - first), first)
                uint8 = to_uint8(x)
                part.add(uint8, y, score_fn(uint8) if score_fn is not None else None)
                if not timed:  # the first batch times the rest (it includes any warm-up: an upper bound)
                    timed = True
                    log(f"[rank {procs.rank}/{procs.world_size}] "
                        + estimate_line(time.perf_counter() - start_time, len(uint8), total, calls))
        except KeyboardInterrupt:  # Ctrl-C / SIGTERM: the finished batches of this shard stay too
            part.keep(shards, time.perf_counter() - part_start)
            raise
        shard_seconds = part.seconds(time.perf_counter() - part_start)
        kept.append(shard_seconds)
        write_seconds(shard_path(shards, start, end), shard_seconds)
        write_shard(shard_path(shards, start, end), *part.arrays(), feature_id)
        part.remove()
        done += end - (begun[(start, end)] or (start,))[0]
        seconds = time.perf_counter() - start_time
        rate = done / max(seconds, 1e-9)
        log(f"[rank {procs.rank}/{procs.world_size}] samples {start}-{end - 1} written: {done}/{total} "
            f"({rate:.2f} samples/s, ETA {_duration((total - done) / rate)})")
    return _stats(done, time.perf_counter() - start_time, sum(e - s for s, e in mine), total, kept)


def _stats(done: int, seconds: float, mine: int, total: int, kept: list[float | None]) -> dict[str, Any]:
    """This run's counts and timing, and the seconds of all the runs that made this process's ``mine`` samples
    (None where a shard predates the timing sidecars)."""
    all_runs = None if None in kept else sum(kept)
    return {"generated": done, "seconds": seconds, "samples_per_second": done / seconds if done else 0.0,
            "skipped": mine - total, "seconds_all_runs": all_runs,
            "samples_per_second_all_runs": mine / all_runs if all_runs else None}


class _Part:
    """The batches of one shard so far: those of an interrupted run's ``.partial.npz`` (features recomputed in the
    same batches when they were made by another extractor) and the new ones; ``keep`` writes them as the shard's
    partial file (atomically), ``remove`` deletes that file once the whole shard is written."""

    def __init__(self, start: int, begun: tuple[int, Path] | None, score_fn, batch_size: int,
                 feature_id: str) -> None:
        self.start, self.upto, self.path, self.feature_id = start, start, None, feature_id
        self.seconds_before: float | None = 0.0  # generating the batches of an interrupted run (None: not recorded)
        self.images: list[np.ndarray] = []
        self.labels: list[np.ndarray] = []
        self.features: list[dict[str, torch.Tensor]] = []
        if begun is None:
            return
        self.upto, self.path = begun
        self.seconds_before = read_seconds(self.path)
        data = read_shard(self.path)
        self.images.append(data["arr_0"])
        if "arr_1" in data:
            self.labels.append(data["arr_1"])
        if score_fn is not None:
            stored = {k[len(FEATURE_PREFIX):]: torch.from_numpy(v) for k, v in data.items()
                      if k.startswith(FEATURE_PREFIX)}
            if str(data.get("feature_id", "")) == feature_id and stored:
                self.features.append(stored)
            else:
                pixels = torch.from_numpy(data["arr_0"]).permute(0, 3, 1, 2).contiguous()
                self.features += [score_fn(pixels[i:i + batch_size]) for i in range(0, len(pixels), batch_size)]

    def add(self, uint8: torch.Tensor, labels: Any, features: dict[str, torch.Tensor] | None) -> None:
        self.images.append(uint8.permute(0, 2, 3, 1).contiguous().numpy())
        if labels is not None:
            self.labels.append(torch.as_tensor(labels).cpu().numpy())
        if features is not None:
            self.features.append(features)

    def arrays(self) -> tuple[np.ndarray, np.ndarray | None, dict[str, torch.Tensor]]:
        merged = {k: torch.cat([f[k] for f in self.features]) for k in self.features[0]} if self.features else {}
        return np.concatenate(self.images), np.concatenate(self.labels) if self.labels else None, merged

    def seconds(self, elapsed: float) -> float | None:
        """This shard's generation time so far: the interrupted runs' and ``elapsed`` of this one."""
        return None if self.seconds_before is None else self.seconds_before + elapsed

    def keep(self, shards: Path, elapsed: float) -> None:
        count = sum(len(i) for i in self.images)
        if count and self.start + count > self.upto:
            images, labels, features = self.arrays()
            path = partial_path(shards, self.start, self.start + count)
            write_seconds(path, self.seconds(elapsed))
            write_shard(path, images, labels, features, self.feature_id)
            self.remove()

    def remove(self) -> None:
        if self.path is not None:
            self.path.unlink(missing_ok=True)
            seconds_path(self.path).unlink(missing_ok=True)


def estimate_line(seconds: float, measured: int, total: int, calls: int | None) -> str:
    """``estimated time: ~X min for N samples (M network calls; ...)`` from ``measured`` samples in ``seconds``."""
    estimate = seconds / max(measured, 1) * total
    work = f"{total} samples" + ("" if calls is None else f" ({calls} network calls")
    return (f"estimated time: ~{estimate / 60:.1f} min for {work}{'; ' if calls is not None else ' ('}the first "
            f"{measured} took {seconds:.1f} s)")


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


# ---------------------------------------------------------------------------------- rank 0: outputs
def assemble(out_dir: Path, shards: Path, num_samples: int, shard_size: int) -> dict[str, str]:
    """``samples.npz`` (ADM layout, 3 channels, streamed shard by shard) and ``grid.png`` of the first 100."""
    ranges = shard_ranges(num_samples, shard_size)
    first = read_shard(shard_path(shards, *ranges[0]))
    h, w = first["arr_0"].shape[1:3]
    has_labels = "arr_1" in first

    def chunks(key: str) -> Iterator[np.ndarray]:
        for r in ranges:
            arr = read_shard(shard_path(shards, *r))[key]
            yield np.repeat(arr, 3, axis=-1) if key == "arr_0" and arr.shape[-1] == 1 else arr

    arrays: dict[str, Any] = {"arr_0": ((num_samples, h, w, 3), np.uint8, chunks("arr_0"))}
    if has_labels:
        arrays["arr_1"] = ((num_samples,), np.int64, chunks("arr_1"))
    write_npz(out_dir / "samples.npz", arrays)  # a full disk: NoSpaceLeft naming samples.npz
    grid = []
    for r in ranges:
        grid.append(read_shard(shard_path(shards, *r))["arr_0"][: 100 - sum(len(g) for g in grid)])
        if sum(len(g) for g in grid) >= 100:
            break
    preview = torch.from_numpy(np.concatenate(grid)).permute(0, 3, 1, 2).float() / 127.5 - 1
    nrow = min(10, max(1, int(len(preview) ** 0.5)))
    save_grid(preview, out_dir / "grid.png", nrow=nrow)
    return {"grid": str(out_dir / "grid.png"), "samples": str(out_dir / "samples.npz"), "shards": str(shards)}


def shard_outputs(shards: Path, num_samples: int, shard_size: int, feature_id: str,
                  score_fn: Callable[[torch.Tensor], dict[str, torch.Tensor]], wanted: set[str],
                  ) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor | None]]:
    """Per shard, in index order: its stored features (computed from its images when missing or made by
    another extractor, e.g. shards written by ``ddpm-sample``) and its labels."""
    for r in shard_ranges(num_samples, shard_size):
        data = read_shard(shard_path(shards, *r))
        stored = {k[len(FEATURE_PREFIX):]: torch.from_numpy(v) for k, v in data.items()
                  if k.startswith(FEATURE_PREFIX)}
        if str(data.get("feature_id", "")) != feature_id or not wanted <= set(stored):
            stored = score_fn(torch.from_numpy(data["arr_0"]).permute(0, 3, 1, 2).contiguous())
        labels = torch.from_numpy(data["arr_1"]) if "arr_1" in data else None
        yield stored, labels
