"""Pixel-level transforms: fitting images to the training size, the [-1, 1] model range, flips.

Everything here works on whole uint8 batches (``[N, C, H, W]`` tensors) or on single PIL images; no
per-sample work is done for data held in memory.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from ..config.choices import FIT_METHODS
from ..pixels import to_model_range, to_uint8  # noqa: F401  (re-exported: the data package's names)

FitMethod = Literal["pad", "resize"]


def random_hflip(images: Tensor, p: float = 0.5, generator: torch.Generator | None = None) -> Tensor:
    """Flip each image of a ``[B, C, H, W]`` batch left-right with probability ``p``."""
    flip = torch.rand(images.shape[0], generator=generator) < p
    return torch.where(flip.view(-1, 1, 1, 1).to(images.device), images.flip(-1), images)


def center_crop(images: Tensor, size: int) -> Tensor:
    """Central ``size x size`` crop of a ``[N, C, H, W]`` batch."""
    h, w = images.shape[-2:]
    if size > min(h, w):
        raise ValueError(f"center_crop={size} is larger than the images ({h}x{w}); use a crop <= {min(h, w)}")
    top, left = (h - size) // 2, (w - size) // 2
    return images[..., top : top + size, left : left + size]


def pad_to(images: Tensor, size: int, value: int = 0) -> Tensor:
    """Pad a square ``[N, C, H, W]`` batch on all sides with ``value`` to ``size x size`` (centred)."""
    h = images.shape[-1]
    if h > size:
        raise ValueError(f"cannot pad {h}x{h} images to {size}x{size}; use data.fit=resize to shrink them")
    before = (size - h) // 2
    after = size - h - before
    return F.pad(images, (before, after, before, after), value=value)


def resize_uint8(images: Tensor, size: int) -> Tensor:
    """Bilinear (antialiased) resize of a uint8 ``[N, C, H, W]`` batch to ``size x size``."""
    if images.shape[-2:] == (size, size):
        return images
    out = F.interpolate(
        images.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False
    )
    return out.round().clamp(0, 255).to(torch.uint8)


def fit_images(images: Tensor, image_size: int, fit: FitMethod = "resize", crop: int | None = None) -> Tensor:
    """Bring a uint8 ``[N, C, H, W]`` batch to ``image_size x image_size``.

    Non-square images are first centre-cropped to a square (to ``crop`` pixels when given).
    ``fit="pad"`` pads smaller images with black (0), the background of silhouettes and digits;
    ``fit="resize"`` resizes bilinearly with antialiasing.
    """
    if fit not in FIT_METHODS:
        raise ValueError(f"fit={fit!r} is not one of {FIT_METHODS}")
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(f"expected uint8 [N, C, H, W] images, got {images.dtype} {tuple(images.shape)}")
    h, w = images.shape[-2:]
    if crop is not None or h != w:
        images = center_crop(images, crop if crop is not None else min(h, w))
    if fit == "pad":
        return pad_to(images, image_size)
    return resize_uint8(images, image_size)


def fit_pil(image: Image.Image, image_size: int, crop: int | None = None) -> Image.Image:
    """Centre-crop a PIL image to a square and resize it to ``image_size`` (bicubic, antialiased).

    With ``crop`` a central ``crop x crop`` square is cut first (e.g. 140 for CelebA faces);
    otherwise the short side is scaled to ``image_size`` and the long side centre-cropped, the
    preprocessing ADM applies to ImageNet.
    """
    w, h = image.size
    side = crop if crop is not None else min(w, h)
    if side > min(w, h):
        raise ValueError(f"center_crop={side} is larger than the image ({w}x{h})")
    left, top = (w - side) // 2, (h - side) // 2
    box = (left, top, left + side, top + side)
    return image.resize((image_size, image_size), Image.Resampling.BICUBIC, box=box, reducing_gap=3.0)


class ToModelBatch:
    """``collate_fn`` for batches fetched whole by ``ImageSubset.__getitems__``: ``(uint8 images, labels)`` ->
    ``(x float32 [B, C, H, W] in [-1, 1], y int64 [B])``. Flips are drawn after transfer by the data module (so
    that prefetching does not shift the RNG stream: exact resume)."""

    def __call__(self, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        images, labels = batch
        return to_model_range(images), labels.to(torch.int64)
