"""A small clean-image classifier: the offline stand-in for Inception IS, and class accuracy of samples.

Inception Score needs InceptionV3's 1008-way logits, which no installable package ships. ``is_clf`` is the
same formula with this classifier, trained on the data set itself (clean images, not noisy x_t like the
guidance classifier). ``classify`` also measures the class accuracy of guided samples.

Saved with ``torch.save`` as a dict of primitives and tensors (``state_dict``, ``config``, ``data_name``,
``image_size``, ``channels``, ``num_classes``, ``val_accuracy``) and loaded with ``weights_only=True``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..artifacts import atomic_torch_save
from .reference import _slug, default_cache_dir

log = logging.getLogger(__name__)

ClassifierData = tuple[torch.Tensor, torch.Tensor]


class CleanClassifier(nn.Module):
    """Conv3x3 stem then stride-2 conv blocks (GroupNorm, SiLU), global average pool, linear head.

    Takes float images in [-1, 1] ``[N, channels, H, W]``; ``classify`` feeds it uint8. With the default
    widths (32, 64, 64, 96) it has ~113k parameters.
    """

    def __init__(self, channels: int, num_classes: int, widths: Sequence[int] = (32, 64, 64, 96),
                 groups: int = 8) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        widths = [int(w) for w in widths]
        if not widths or any(w % groups for w in widths):
            raise ValueError(f"widths must be non-empty multiples of groups={groups}, got {widths}")
        self.config = {"channels": channels, "num_classes": num_classes, "widths": widths, "groups": groups}
        layers: list[nn.Module] = []
        prev = channels
        for i, width in enumerate(widths):
            layers += [nn.Conv2d(prev, width, 3, stride=1 if i == 0 else 2, padding=1),
                       nn.GroupNorm(groups, width), nn.SiLU()]
            prev = width
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(prev, num_classes)
        # Provenance, filled by training / loading (saved beside the weights, not in the state dict).
        self.val_accuracy = float("nan")
        self.data_name = ""
        self.image_size = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _to_input(images: torch.Tensor, channels: int) -> torch.Tensor:
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != channels:
        got = f"{images.dtype} {tuple(images.shape)}"
        raise ValueError(f"expected uint8 images [N, {channels}, H, W], got {got}")
    return images.float() / 127.5 - 1


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.inference_mode()
def classifier_logits(model: CleanClassifier, images: torch.Tensor, *, batch_size: int = 256,
                      device: str | torch.device | None = None) -> torch.Tensor:
    """Float32 logits ``[N, num_classes]`` on the CPU for uint8 images, in eval mode, in batches."""
    device = torch.device(device) if device is not None else _model_device(model)
    was_training = model.training
    model.eval()
    try:
        out = [model(_to_input(b, model.config["channels"]).to(device)).float().cpu()
               for b in images.split(batch_size)]
    finally:
        model.train(was_training)
    return torch.cat(out)


def classify(model: CleanClassifier, images: torch.Tensor, *, batch_size: int = 256,
             device: str | torch.device | None = None) -> torch.Tensor:
    """Class probabilities ``[N, num_classes]`` (float32, CPU) for uint8 images ``[N, C, H, W]``."""
    return classifier_logits(model, images, batch_size=batch_size, device=device).softmax(dim=1)


def train_clean_classifier(images: torch.Tensor, labels: torch.Tensor, num_classes: int, *, epochs: int = 10,
                           batch_size: int = 128, seed: int = 0, lr: float = 2e-3, val_fraction: float = 0.1,
                           widths: Sequence[int] = (32, 64, 64, 96), device: str | torch.device = "cpu",
                           ) -> CleanClassifier:
    """Train a ``CleanClassifier`` with AdamW on uint8 images ``[N, C, H, W]`` and integer labels.

    A random ``val_fraction`` of the images (at least one) is held out; the final accuracy on it is stored
    as ``model.val_accuracy``. Initialisation and shuffling are seeded without touching the global RNG.
    The returned model is in eval mode on ``device``.
    """
    labels = torch.as_tensor(labels).long().reshape(-1)
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise ValueError(f"expected uint8 images [N, C, H, W], got {images.dtype} {tuple(images.shape)}")
    if labels.shape[0] != images.shape[0]:
        raise ValueError(f"got {images.shape[0]} images but {labels.shape[0]} labels")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}), got [{labels.min()}, {labels.max()}]")
    if not 0 < val_fraction < 1 or images.shape[0] < 2:
        raise ValueError(f"need >= 2 images and 0 < val_fraction < 1, got {images.shape[0]}, {val_fraction}")
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(images.shape[0], generator=gen)
    n_val = max(1, round(val_fraction * images.shape[0]))
    val_idx, train_idx = perm[:n_val], perm[n_val:]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CleanClassifier(images.shape[1], num_classes, widths=widths)
    model.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    channels = images.shape[1]
    for epoch in range(epochs):
        model.train()
        order = train_idx[torch.randperm(train_idx.shape[0], generator=gen)]
        total = 0.0
        for idx in order.split(batch_size):
            x = _to_input(images[idx], channels).to(device)
            loss = F.cross_entropy(model(x), labels[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * idx.shape[0]
        log.info("clean classifier epoch %d: train loss %.4f", epoch, total / max(1, train_idx.shape[0]))
    model.eval()
    pred = classifier_logits(model, images[val_idx]).argmax(dim=1)
    model.val_accuracy = float((pred == labels[val_idx]).float().mean())
    return model


def save_classifier(model: CleanClassifier, path: str | Path, *, data_name: str, image_size: int) -> None:
    """Write the classifier atomically as a ``weights_only``-loadable dict."""
    payload = {
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "config": dict(model.config),
        "data_name": str(data_name),
        "image_size": int(image_size),
        "channels": int(model.config["channels"]),
        "num_classes": int(model.config["num_classes"]),
        "val_accuracy": float(model.val_accuracy),
    }
    atomic_torch_save(payload, path)


def load_classifier(path: str | Path, *, device: str | torch.device = "cpu") -> CleanClassifier:
    """Load a classifier written by ``save_classifier`` (``weights_only=True``), in eval mode."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"classifier file not found: {path}")
    payload = torch.load(path, map_location="cpu", weights_only=True)
    model = CleanClassifier(**payload["config"])
    model.load_state_dict(payload["state_dict"])
    model.val_accuracy = float(payload["val_accuracy"])
    model.data_name, model.image_size = payload["data_name"], int(payload["image_size"])
    return model.to(device).eval()


def clean_classifier_path(cache_dir: str | Path | None, data_name: str, image_size: int, epochs: int,
                          seed: int) -> Path:
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return root / "classifiers" / f"{_slug(data_name)}-{image_size}px-e{epochs}-s{seed}.pt"


def cached_clean_classifier(data: ClassifierData | Callable[[], ClassifierData], *, data_name: str,
                            image_size: int, num_classes: int, cache_dir: str | Path | None = None,
                            epochs: int = 10, batch_size: int = 128, seed: int = 0,
                            device: str | torch.device = "cpu") -> CleanClassifier:
    """The data set's clean classifier, loaded from the cache or trained once and saved there.

    ``data`` is ``(images_uint8, labels)`` or a zero-argument callable returning it (not called on a cache
    hit). The file is ``<cache_dir>/classifiers/<data>-<size>px-e<epochs>-s<seed>.pt``.
    """
    path = clean_classifier_path(cache_dir, data_name, image_size, epochs, seed)
    if path.is_file():
        return load_classifier(path, device=device)
    images, labels = data() if callable(data) else data
    if tuple(images.shape[-2:]) != (image_size, image_size):
        raise ValueError(f"classifier images must be {image_size}x{image_size}, got {tuple(images.shape)}")
    model = train_clean_classifier(images, labels, num_classes, epochs=epochs, batch_size=batch_size,
                                   seed=seed, device=device)
    save_classifier(model, path, data_name=data_name, image_size=image_size)
    model.data_name, model.image_size = data_name, image_size
    return model
