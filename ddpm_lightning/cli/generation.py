"""Shared by ddpm-sample and ddpm-eval: load a checkpoint, set up guidance, generate, and write the outputs
(PNG grid, ``.npz`` of uint8 samples in the ADM evaluator's layout: ``arr_0`` NHWC, labels in ``arr_1``)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info

from ..callbacks.sample_grid import save_grid
from ..metrics import to_uint8
from ..modules.checkpoint import load_diffusion_module
from ..modules.classifier_module import load_classifier_guidance


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
    """The diffusion module plus (cond_fn, classifier class count) for classifier guidance, validated."""
    module = load_diffusion_module(ckpt, map_location=device)
    classifier_ckpt, scale = guidance.get("classifier_ckpt"), float(guidance.get("scale") or 0.0)
    cfg_scale = float(guidance.get("cfg_scale") or 0.0)
    if cfg_scale < 0:
        raise ValueError(f"guidance.cfg_scale must be >= 0, got {cfg_scale}")
    if cfg_scale and module.null_label is None:
        raise ValueError(f"guidance.cfg_scale={cfg_scale} needs a model trained with label dropout "
                         f"(train.p_uncond > 0); {ckpt} was not")
    cond_fn, num_classes = load_classifier_guidance(classifier_ckpt, scale, module.hparams, map_location=device)
    return module, cond_fn, num_classes, cfg_scale


def sampling_overrides(sampler: str | None, steps, eta: float | None) -> dict[str, Any]:
    """Command-line sampler settings; null keeps the checkpoint's own (its training config's ``sample``),
    ``steps=all`` runs every one of the T steps."""
    overrides: dict[str, Any] = {}
    if sampler is not None:
        overrides["method"] = str(sampler)
    if steps is not None:
        overrides["steps"] = None if str(steps) == "all" else steps
    if eta is not None:
        overrides["eta"] = float(eta)
    return overrides


def generate(module, *, num_samples: int, sampler: str | None, steps, eta: float | None, clip_denoised: bool, y,
             cond_fn, guidance_num_classes, cfg_scale: float, batch_size: int, seed: int, precision: str = "32"):
    """Samples in [-1, 1], labels, seconds and the sampler settings used (``sampler``/``steps``/``eta`` None:
    the checkpoint's own)."""
    start = time.perf_counter()
    autocast = (torch.autocast(module.device.type, dtype=torch.bfloat16) if precision == "bf16"
                else torch.autocast(module.device.type, enabled=False))
    if precision not in ("32", "bf16"):
        raise ValueError(f"precision={precision!r}; allowed: 32, bf16")
    overrides = sampling_overrides(sampler, steps, eta)
    if isinstance(parse_labels(y), int) and not labels_allowed(module, cond_fn):  # never ignored silently
        raise ValueError(f"y={y}: the model is unconditional (no class labels) and no classifier guides it; "
                         f"drop y, or give guidance.classifier_ckpt with guidance.scale > 0")
    used = {k: v for k, v in module.sampling_options(**overrides).items() if k in ("method", "steps", "eta")}
    with autocast:
        images, labels = module.sample(num_samples, **overrides, clip_denoised=clip_denoised,
                                       y=parse_labels(y) if labels_allowed(module, cond_fn) else "random",
                                       cond_fn=cond_fn, guidance_num_classes=guidance_num_classes,
                                       cfg_scale=cfg_scale, batch_size=batch_size, seed=seed, progress=False)
    seconds = time.perf_counter() - start
    rank_zero_info(f"sampled {num_samples} images ({used['method']}, steps={used['steps']}, eta={used['eta']}) "
                   f"in {seconds:.1f} s ({num_samples / seconds:.2f} samples/s)")
    return images, labels, seconds, used


def labels_allowed(module, cond_fn) -> bool:
    return module.num_classes is not None or cond_fn is not None


def write_outputs(out_dir: Path, images: torch.Tensor, labels: torch.Tensor | None, nrow: int | None = None) -> dict:
    """grid.png (first 100) and samples.npz (ADM layout), both written atomically."""
    out_dir.mkdir(parents=True, exist_ok=True)
    grid = save_grid(images[:100], out_dir / "grid.png", nrow=nrow or min(10, max(1, int(len(images) ** 0.5))))
    arr = to_uint8(images).permute(0, 2, 3, 1).numpy()
    tmp = out_dir / "samples.tmp.npz"
    payload = {"arr_0": arr} if labels is None else {"arr_0": arr, "arr_1": labels.numpy().astype(np.int64)}
    np.savez(tmp, **payload)
    os.replace(tmp, out_dir / "samples.npz")
    return {"grid": str(grid), "samples": str(out_dir / "samples.npz")}


def write_json(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str))
    os.replace(tmp, path)


def load_samples(path: str | Path) -> tuple[torch.Tensor, torch.Tensor | None]:
    """uint8 [N, C, H, W] samples from an ADM-layout .npz (arr_0 NHWC) or an image folder."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"samples={path} does not exist")
    if path.is_dir():
        from PIL import Image

        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp", ".webp"))
        if not files:
            raise ValueError(f"samples folder {path} holds no images")
        arrays = []
        for file in files:
            with Image.open(file) as image:
                arrays.append(np.asarray(image.convert("L" if image.mode in ("L", "I;16", "1") else "RGB")))
        arr = np.stack(arrays)
        arr = arr[..., None] if arr.ndim == 3 else arr
        return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous(), None
    try:
        with np.load(path, allow_pickle=False) as data:
            if "arr_0" not in data:
                raise ValueError(f"{path} has no arr_0 (expected the ADM layout: arr_0 uint8 NHWC, optional arr_1)")
            arr = data["arr_0"]
            labels = data["arr_1"] if "arr_1" in data.files else None
    except (OSError, EOFError) as error:
        raise ValueError(f"{path} is not a readable .npz ({error})") from None
    if arr.dtype != np.uint8 or arr.ndim != 4:
        raise ValueError(f"{path}: arr_0 must be uint8 [N, H, W, C], got {arr.dtype} {arr.shape}")
    images = torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()
    return images, None if labels is None else torch.from_numpy(labels.astype(np.int64))
