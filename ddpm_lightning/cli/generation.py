"""Shared by ddpm-sample and ddpm-eval: load a checkpoint, set up guidance, generate into the run folder's shards
(``shards.py``: streamed, resumable, shared by processes) and write the outputs (PNG grid, ``samples.npz`` of
uint8 samples in the ADM evaluator's layout: ``arr_0`` NHWC with 3 channels, labels in ``arr_1``)."""

from __future__ import annotations

import dataclasses
import sys
import zipfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info

from ..config.choices import ETA_METHODS, IMAGE_SUFFIXES, PRECISIONS
from ..config.schema import GuidanceConfig, SampleConfig
from ..metrics.npz import iter_npz_rows, npz_member
from ..modules.checkpoint import load_diffusion_checkpoint
from ..modules.guidance import guidance_config, load_guidance
from ..sampling import Guidance, resolve_sampler
from .shards import (
    PARTIAL_NAME,
    SHARD_NAME,
    NoSpaceLeft,
    Processes,
    assemble,
    check_disk,
    check_settings,
    close_processes,
    finished,
    generate_shards,
    sigterm_as_interrupt,
)

# the ddpm-sample / ddpm-eval keys that override a checkpoint's own sampler settings (SampleConfig fields)
SAMPLER_OVERRIDES = ("method", "steps", "eta", "schedule", "clip_denoised", "batch_size")


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={device} but no CUDA device is available; use device=cpu")
    return torch.device(device)


def parse_labels(y: Any) -> int | str | None:
    """``y=`` on the command line: 'random', 'balanced' or a class index."""
    if y is None or isinstance(y, int):
        return y
    text = str(y).strip()
    if text in ("random", "balanced"):
        return text
    if text.lstrip("-").isdigit():
        return int(text)
    raise ValueError(f"y={y!r}; allowed: random, balanced, or a class index")


def load_model_and_guidance(ckpt: str, guidance: GuidanceConfig | Mapping[str, Any] | None,
                            device: torch.device) -> tuple[Any, Guidance]:
    """The diffusion module and its ``Guidance`` (``modules.guidance.load_guidance``), validated.

    ``ckpt``, ``guidance.classifier_ckpt`` and ``guidance.autoguidance_ckpt`` may be ``ddpm-train`` checkpoints or
    official ADM weights converted by ``ddpm-convert-adm`` (its flags give the diffusion settings)."""
    module = load_diffusion_checkpoint(ckpt, map_location=device)
    return module, load_guidance(guidance, module, map_location=device, model_name=str(ckpt))


@dataclass(frozen=True)
class Generation:
    """One generation run, planned once per command (``plan_generation``) and passed whole to ``generate``:
    where (``out_dir``), how many, with which sampler (``SampleConfig``, resolved once against the checkpoint's
    own) and guidance (``Guidance``, loaded once; ``guidance_config`` is what the user asked for, recorded),
    labels ``y``, ``seed``, ``precision`` and ``shard_size``; ``ckpt`` names the model in the shards' record."""

    out_dir: Path
    num_samples: int
    sampler: SampleConfig
    guidance: Guidance = field(default_factory=Guidance)
    guidance_config: GuidanceConfig = field(default_factory=GuidanceConfig)
    y: Any = "random"
    seed: int = 0
    precision: str = "32"
    shard_size: int = 1000
    ckpt: str | None = None

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision={self.precision!r}; allowed: {', '.join(PRECISIONS)}")
        if self.num_samples < 1 or self.shard_size < 1:
            raise ValueError(f"num_samples and shard_size must be >= 1, got {self.num_samples}, {self.shard_size}")

    @property
    def sampling(self) -> dict[str, Any]:
        """The sampler settings recorded with the samples (shards, ``sample.json``, ``results.json``)."""
        return {key: getattr(self.sampler, key) for key in ("method", "steps", "eta", "schedule")}


def plan_generation(cfg: Any, out_dir: Path, device: torch.device) -> tuple[Any, Generation]:
    """The model and the ``Generation`` of a ``ddpm-sample`` / ``ddpm-eval`` config, each built once: the
    checkpoint (``ckpt``) and its guidance (the ``guidance`` group, loaded), and the sampler keys
    (``SAMPLER_OVERRIDES``) resolved against the checkpoint's own ``sample:`` settings (null keeps them)."""
    wanted = guidance_config(cfg.get("guidance"))
    module, guidance = load_model_and_guidance(cfg.ckpt, wanted, device)
    run = Generation(out_dir=out_dir, num_samples=int(cfg.num_samples),
                     sampler=command_sampler(cfg, module.sample_settings), guidance=guidance, guidance_config=wanted,
                     y=cfg.get("y"), seed=int(cfg.seed), precision=str(cfg.precision),
                     shard_size=int(cfg.shard_size), ckpt=str(cfg.ckpt))
    return module, run


def command_sampler(cfg: Any, own: SampleConfig) -> SampleConfig:
    """The sampler a ``ddpm-sample`` / ``ddpm-eval`` config asks for: its ``SAMPLER_OVERRIDES`` keys on top of
    the checkpoint's ``own`` settings (``sampling.resolve_sampler``: null keeps them, steps=all every step)."""
    return resolve_sampler(own, {key: cfg.get(key) for key in SAMPLER_OVERRIDES})


def generate(module, run: Generation, *, procs: Processes | None = None, scorer=None) -> dict[str, Any]:
    """Generate ``run.num_samples`` into ``run.out_dir``'s shards (this process's share, missing ones only), then
    on rank 0 write ``samples.npz`` and ``grid.png``. ``scorer`` (a ``GenerativeMetrics``): each shard also
    stores its samples' features. Returns the sampler settings used, counts, timing and (rank 0) the outputs."""
    procs = procs or Processes(device=module.device)
    labels = generation_labels(module, run)
    shards = run.out_dir / "shards"
    check_settings(shards, _record(run, labels), procs.rank)
    done = sum(end - start for start, end in finished(shards, run.num_samples, run.shard_size))
    budget = check_disk(run.out_dir, run.num_samples, done, tuple(module.image_shape), scored=scorer is not None)
    calls = network_calls(module, run)
    procs.barrier()
    stats = generate_shards(_sample_fn(module, run, labels), shards=shards, num_samples=run.num_samples,
                            shard_size=run.shard_size, batch_size=run.sampler.batch_size, procs=procs,
                            score_fn=scorer.outputs if scorer else None,
                            feature_id=scorer.outputs_id if scorer else "",
                            calls_per_batch=calls.get("network_calls_per_image"))
    procs.barrier()
    used = run.sampling
    eta = f"eta={used['eta']}, " if used["method"] in ETA_METHODS else ""  # the others do not use it
    rank_zero_info(f"sampled {stats['generated']} images ({used['method']}, steps={used['steps']}, "
                   f"{eta}schedule={used['schedule']}) in {stats['seconds']:.1f} s "
                   f"({stats['samples_per_second']:.2f} samples/s "
                   f"on rank {procs.rank} of {procs.world_size}; {stats['skipped']} kept from an earlier run)")
    result = {"sampling": used, "generation": {**stats, **budget, **calls, "world_size": procs.world_size,
                                               "shard_size": run.shard_size}}
    if procs.rank == 0:
        result["outputs"] = assemble(run.out_dir, shards, run.num_samples, run.shard_size)
    return result


def sampling_time(generation: dict[str, Any]) -> dict[str, float | None]:
    """A result's ``sampling_seconds`` and ``samples_per_second``: generating all of rank 0's samples, summed over
    the runs that made them (a rerun that kept every shard still reports the job's time; None where a shard
    predates the timing sidecars), not only this run's part (``generation.seconds``)."""
    return {"sampling_seconds": generation.get("seconds_all_runs"),
            "samples_per_second": generation.get("samples_per_second_all_runs")}


def generation_labels(module, run: Generation) -> int | str | None:
    """The labels ``y`` asks for; a class index for a model that has no labels is refused, never ignored."""
    allowed = labels_allowed(module, run.guidance.cond_fn)
    label = parse_labels(run.y)
    if isinstance(label, int) and not allowed:
        raise ValueError(f"y={run.y}: the model is unconditional (no class labels) and no classifier guides it; "
                         f"drop y, or give guidance.classifier_ckpt with guidance.scale > 0")
    classes = module.num_classes if module.num_classes is not None else run.guidance.classifier_classes
    if isinstance(label, int) and classes is not None and not 0 <= label < int(classes):
        whose = "the model" if module.num_classes is not None else "the guiding classifier"
        raise ValueError(f"y={label} is out of range: {whose} knows classes 0..{int(classes) - 1}; give y=0.."
                         f"{int(classes) - 1}, random or balanced")
    return label if allowed else "random"


def _record(run: Generation, labels: Any) -> dict[str, Any]:
    """What made the shards (``shards/run.json``): a rerun with other settings into the same folder is refused."""
    return {"ckpt": run.ckpt, "guidance": dataclasses.asdict(run.guidance_config), "sampling": run.sampling,
            "y": labels, "seed": run.seed, "precision": run.precision, "clip_denoised": run.sampler.clip_denoised,
            "cfg_scale": float(run.guidance.cfg_scale), "shard_size": run.shard_size}


def _sample_fn(module, run: Generation, labels: Any) -> Callable[[int, int], Any]:
    def sample_fn(n: int, first_index: int):
        autocast = (torch.autocast(module.device.type, dtype=torch.bfloat16) if run.precision == "bf16"
                    else torch.autocast(module.device.type, enabled=False))
        with autocast:
            return module.sample(n, run.sampler, guidance=run.guidance, y=labels, seed=run.seed,
                                 first_index=first_index, progress=False)
    return sample_fn


def network_calls(module, run: Generation) -> dict[str, int]:
    """The work of one image (``Guidance.network_calls`` over the sampler's kept original steps):
    ``network_calls_per_image`` (diffusion-network evaluations: classifier-free guidance's doubled batch and
    autoguidance's guiding model count twice where they act) and ``classifier_gradients_per_image`` (classifier
    guidance's forward + backward passes); {} where the module cannot say."""
    if not callable(getattr(module, "sampling_process", None)):
        return {}
    calls = run.guidance.network_calls(module.sampling_process(run.sampler).timestep_map.tolist())
    return {f"{key}_per_image": value for key, value in calls.items()}


def kept_samples(out_dir: Path) -> int:
    shards = out_dir / "shards"
    if not shards.is_dir():
        return 0
    total = 0
    for path in shards.iterdir():
        match = SHARD_NAME.match(path.name) or PARTIAL_NAME.match(path.name)  # finished shards and finished batches
        if match:
            total += int(match.group(2)) - int(match.group(1))
    return total


def keep_finished_shards(out_dir: Path, fn: Callable[[], Any]) -> Any:
    """Run ``fn``; Ctrl-C / SIGTERM end in one line and exit code 130, a full disk in one ``error:`` line
    (exit 1); either way the finished shards stay and a rerun into ``out_dir`` continues from them. The
    processes ``devices=N`` started end with the run (the next job of a multirun starts its own)."""
    try:
        with sigterm_as_interrupt():
            return fn()
    except KeyboardInterrupt:
        print(f"interrupted: kept {kept_samples(out_dir)} finished samples in {out_dir / 'shards'}; rerun the "
              f"same command with hydra.run.dir={out_dir} to continue", file=sys.stderr)
        sys.exit(130)
    except NoSpaceLeft as error:
        print(f"error: no space left on {error.path}: kept {kept_samples(out_dir)} finished samples in "
              f"{out_dir / 'shards'}; free space and rerun the same command with hydra.run.dir={out_dir} to continue",
              file=sys.stderr)
        sys.exit(2)  # as every CLI's one-line errors
    finally:
        close_processes()


def labels_allowed(module, cond_fn) -> bool:
    return module.num_classes is not None or cond_fn is not None


@dataclass
class SampleSource:
    """Samples to score, read a batch at a time (``batches``): an ADM-layout ``.npz`` (``arr_0`` uint8 NHWC,
    optional labels ``arr_1``) streamed from its zip member, or an image folder decoded file by file. Only
    the labels are held; a 50k x 256 x 256 x 3 file is scored in the memory of one batch."""

    path: Path
    count: int
    shape: tuple[int, int, int]  # C, H, W
    labels: torch.Tensor | None
    files: list[Path] | None = None  # an image folder's images, in sorted order

    def batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        """uint8 ``[n <= batch_size, C, H, W]`` batches in index order."""
        if self.files is None:
            for chunk in iter_npz_rows(self.path, "arr_0", batch_size):
                yield torch.from_numpy(chunk.copy()).permute(0, 3, 1, 2).contiguous()
            return
        for start in range(0, self.count, batch_size):
            arrays = [_read_image(f) for f in self.files[start:start + batch_size]]
            shapes = {a.shape for a in arrays}
            if len(shapes) > 1 or next(iter(shapes)) != (*self.shape[1:], self.shape[0]):
                raise ValueError(f"samples folder {self.path}: images of other sizes or modes "
                                 f"({sorted(shapes)} after {(*self.shape[1:], self.shape[0])})")
            yield torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def _read_image(file: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(file) as image:
        arr = np.asarray(image.convert("L" if image.mode in ("L", "I;16", "1") else "RGB"))
    return arr[..., None] if arr.ndim == 2 else arr


def open_samples(path: str | Path) -> SampleSource:
    """``samples=``: an ADM-layout .npz (arr_0 NHWC, read in batches) or an image folder (decoded lazily)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"samples={path} does not exist")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ValueError(f"samples folder {path} holds no images")
        h, w, c = _read_image(files[0]).shape
        return SampleSource(path=path, count=len(files), shape=(c, h, w), labels=None, files=files)
    try:
        shape, dtype = npz_member(path, "arr_0")
        with zipfile.ZipFile(path) as archive:
            has_labels = "arr_1.npy" in archive.namelist()
        labels = None
        if has_labels:
            labels = np.concatenate(list(iter_npz_rows(path, "arr_1", 1 << 20)) or [np.zeros(0, np.int64)])
    except KeyError:
        raise ValueError(f"{path} has no arr_0 (expected the ADM layout: arr_0 uint8 NHWC, optional arr_1)") from None
    except (OSError, EOFError, zipfile.BadZipFile) as error:
        raise ValueError(f"{path} is not a readable .npz ({error})") from None
    if dtype != np.uint8 or len(shape) != 4 or shape[-1] not in (1, 3):
        raise ValueError(f"{path}: arr_0 must be uint8 [N, H, W, C], got {dtype} {shape}")
    if labels is not None and len(labels) != shape[0]:
        raise ValueError(f"{path}: arr_1 holds {len(labels)} labels for {shape[0]} samples")
    return SampleSource(path=path, count=shape[0], shape=(shape[3], shape[1], shape[2]),
                        labels=None if labels is None else torch.from_numpy(labels.astype(np.int64)))
