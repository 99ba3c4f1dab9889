"""The uint8 <-> [-1, 1] conversion of images: the one owner (data sets feed the model range, samples are saved
and scored as 8-bit images). Pure torch, at the bottom of the layers: ``data`` and ``metrics`` both use it."""

from __future__ import annotations

import torch
from torch import Tensor


def to_model_range(images: Tensor) -> Tensor:
    """uint8 images in [0, 255] -> float32 in [-1, 1] (``x / 127.5 - 1``)."""
    return images.to(torch.float32) / 127.5 - 1.0


def to_uint8(images: Tensor) -> Tensor:
    """float images in [-1, 1] (model range) -> uint8 in [0, 255], clamped and rounded.

    Samples are saved and scored as these 8-bit images. (ADM's ``image_sample.py`` truncates instead of
    rounding, which shifts every pixel down by half a level on average.)
    """
    return ((images.float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
