"""Shared by ddpm-sample and ddpm-eval: load a checkpoint, set up guidance, generate into the run folder's shards
(``shards.py``: streamed, resumable, shared by processes) and write the outputs (PNG grid, ``samples.npz`` of
uint8 samples in the ADM evaluator's layout: ``arr_0`` NHWC with 3 channels, labels in ``arr_1``)."""

from __future__ import annotations

import dataclasses
import sys
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info

from ..metrics.npz import iter_npz_rows, npz_member
from ..modules.checkpoint import (
    classifier_guidance_from_adm,
    diffusion_module_from_adm,
    is_converted_adm,
    load_checkpoint_dict,
    load_diffusion_module,
)
from ..modules.guidance import load_classifier_guidance
from ..sampling import sampling_overrides
from .shards import (
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
from .validate import IMAGE_SUFFIXES


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


def load_model_and_guidance(ckpt: str, guidance: dict[str, Any], device: torch.device):
    """The diffusion module plus (cond_fn, classifier class count) for classifier guidance, validated.

    ``ckpt`` and ``guidance.classifier_ckpt`` may be ``ddpm-train`` checkpoints or official ADM weights
    converted by ``ddpm-convert-adm`` (its flags give the diffusion settings)."""
    checkpoint = load_checkpoint_dict(ckpt, map_location="cpu")
    if is_converted_adm(checkpoint):
        module = diffusion_module_from_adm(checkpoint, ckpt).to(device)
    else:
        del checkpoint
        module = load_diffusion_module(ckpt, map_location=device)
    classifier_ckpt, scale = guidance.get("classifier_ckpt"), float(guidance.get("scale") or 0.0)
    cfg_scale = float(guidance.get("cfg_scale") or 0.0)
    if cfg_scale < 0:
        raise ValueError(f"guidance.cfg_scale must be >= 0, got {cfg_scale}")
    if cfg_scale and module.null_label is None:
        raise ValueError(f"guidance.cfg_scale={cfg_scale} needs a model trained with label dropout "
                         f"(train.p_uncond > 0); {ckpt} was not")
    if classifier_ckpt:
        classifier = load_checkpoint_dict(classifier_ckpt, map_location="cpu")
        if is_converted_adm(classifier):
            cond_fn, num_classes = classifier_guidance_from_adm(classifier, scale, dict(module.hparams),
                                                                classifier_ckpt, map_location=device)
            return module, cond_fn, num_classes, cfg_scale
    cond_fn, num_classes = load_classifier_guidance(classifier_ckpt, scale, module.hparams, map_location=device)
    return module, cond_fn, num_classes, cfg_scale


def generate(module, *, out_dir: Path, num_samples: int, sampler: str | None, steps, eta: float | None,
             clip_denoised: bool, y, cond_fn, guidance_num_classes, cfg_scale: float, batch_size: int, seed: int,
             precision: str = "32", shard_size: int = 1000, procs: Processes | None = None,
             settings: dict[str, Any] | None = None, scorer=None, schedule: str | None = None) -> dict[str, Any]:
    """Generate ``num_samples`` into ``out_dir``'s shards (this process's share, missing ones only), then on
    rank 0 write ``samples.npz`` and ``grid.png``. ``scorer`` (a ``GenerativeMetrics``): each shard also
    stores its samples' features. ``sampler``/``steps``/``eta`` None: the checkpoint's own. Returns the
    sampler settings used, counts, timing and (rank 0) the output paths."""
    procs = procs or Processes(device=module.device)
    if precision not in ("32", "bf16"):
        raise ValueError(f"precision={precision!r}; allowed: 32, bf16")
    if num_samples < 1 or shard_size < 1 or batch_size < 1:
        raise ValueError(f"num_samples, shard_size and batch_size must be >= 1, got {num_samples}, {shard_size}, "
                         f"{batch_size}")
    if isinstance(parse_labels(y), int) and not labels_allowed(module, cond_fn):  # never ignored silently
        raise ValueError(f"y={y}: the model is unconditional (no class labels) and no classifier guides it; "
                         f"drop y, or give guidance.classifier_ckpt with guidance.scale > 0")
    overrides = sampling_overrides(sampler, steps, eta, schedule)  # null: the checkpoint's own sample settings
    chosen = dataclasses.replace(module.sample_settings, **overrides)
    used = {k: getattr(chosen, k) for k in ("method", "steps", "eta", "schedule")}
    if eta is not None and used["method"] != "ddim":  # never ignored silently
        raise ValueError(f"eta={eta} is DDIM's; the sampler {used['method']} (the checkpoint's own sample.method) does "
                         f"not use it: drop eta, or give sampler=ddim")
    labels = parse_labels(y) if labels_allowed(module, cond_fn) else "random"
    shards = out_dir / "shards"
    check_settings(shards, {**(settings or {}), "sampling": used, "y": labels, "seed": seed, "precision": precision,
                            "clip_denoised": clip_denoised, "cfg_scale": cfg_scale, "shard_size": shard_size},
                   procs.rank)
    done = sum(end - start for start, end in finished(shards, num_samples, shard_size))
    budget = check_disk(out_dir, num_samples, done, tuple(module.image_shape), scored=scorer is not None)
    procs.barrier()

    def sample_fn(n: int, first_index: int):
        autocast = (torch.autocast(module.device.type, dtype=torch.bfloat16) if precision == "bf16"
                    else torch.autocast(module.device.type, enabled=False))
        with autocast:
            return module.sample(n, **overrides, clip_denoised=clip_denoised, y=labels, cond_fn=cond_fn,
                                 guidance_num_classes=guidance_num_classes, cfg_scale=cfg_scale, batch_size=n,
                                 seed=seed, first_index=first_index, progress=False)

    stats = generate_shards(sample_fn, shards=shards, num_samples=num_samples, shard_size=shard_size,
                            batch_size=batch_size, procs=procs, score_fn=scorer.outputs if scorer else None,
                            feature_id=scorer.outputs_id if scorer else "",
                            calls_per_batch=network_calls_per_batch(module, used))
    procs.barrier()
    rank_zero_info(f"sampled {stats['generated']} images ({used['method']}, steps={used['steps']}, "
                   f"eta={used['eta']}, schedule={used['schedule']}) in {stats['seconds']:.1f} s "
                   f"({stats['samples_per_second']:.2f} samples/s "
                   f"on rank {procs.rank} of {procs.world_size}; {stats['skipped']} kept from an earlier run)")
    result = {"sampling": used, "generation": {**stats, **budget, "world_size": procs.world_size,
                                               "shard_size": shard_size}}
    if procs.rank == 0:
        result["outputs"] = assemble(out_dir, shards, num_samples, shard_size)
    return result


def network_calls_per_batch(module, used: dict[str, Any]) -> int | None:
    """The network calls one batch takes: the sampler's kept steps (classifier-free guidance runs each on a
    doubled batch, classifier guidance adds a classifier gradient); None where the module cannot say."""
    diffusion = getattr(module, "diffusion", None)
    if diffusion is None:
        return None
    from ..sampling.sample import sampling_process

    try:
        steps = sampling_process(diffusion, used["method"], used["steps"], used["schedule"]).num_timesteps
    except (ValueError, KeyError, AttributeError):
        return None
    return int(steps)


def kept_samples(out_dir: Path) -> int:
    shards = out_dir / "shards"
    if not shards.is_dir():
        return 0
    total = 0
    for path in shards.iterdir():
        match = SHARD_NAME.match(path.name)
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
