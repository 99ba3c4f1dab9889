"""Reference statistics of real data: computed once, cached on disk as float64 ``.npz``.

A cache entry is keyed by (data set name, split, image size, feature extractor id, n) and holds ``mu``
and ``sigma`` in float64, plus the features themselves in float32 when ``n <= max_features`` (KID and
precision/recall need them). Files are written atomically (temporary file + ``os.replace``) and read
with ``allow_pickle=False``.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .features import extract_features, feature_extractor_id

ImageSource = torch.Tensor | Iterable[torch.Tensor]


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/ddpm_lightning`` (``~/.cache/ddpm_lightning`` when unset)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "ddpm_lightning"


def atomic_save(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temporary file next to ``path``, then move it into place atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@dataclass(frozen=True, eq=False)
class ReferenceStats:
    """Float64 mean/covariance of ``n`` reference features, and the float32 features when kept."""

    mu: np.ndarray
    sigma: np.ndarray
    n: int
    features: np.ndarray | None = None
    feature_id: str = ""

    @classmethod
    def from_features(cls, features: torch.Tensor | np.ndarray, *, keep_features: bool = True,
                      feature_id: str = "") -> ReferenceStats:
        feats = features.detach().cpu().numpy() if torch.is_tensor(features) else np.asarray(features)
        if feats.ndim != 2 or feats.shape[0] < 2:
            raise ValueError(f"need features of shape [n >= 2, D], got {feats.shape}")
        f64 = feats.astype(np.float64)
        return cls(mu=f64.mean(axis=0), sigma=np.cov(f64, rowvar=False), n=int(feats.shape[0]),
                   features=feats.astype(np.float32) if keep_features else None, feature_id=feature_id)

    def save(self, path: str | Path) -> None:
        arrays = {"mu": self.mu.astype(np.float64), "sigma": self.sigma.astype(np.float64),
                  "n": np.int64(self.n), "feature_id": np.str_(self.feature_id)}
        if self.features is not None:
            arrays["features"] = self.features.astype(np.float32)

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)

        atomic_save(Path(path), write)

    @classmethod
    def load(cls, path: str | Path) -> ReferenceStats:
        with np.load(Path(path), allow_pickle=False) as data:
            return cls(mu=data["mu"], sigma=data["sigma"], n=int(data["n"]),
                       features=data["features"] if "features" in data.files else None,
                       feature_id=str(data["feature_id"]))


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", str(text)).strip("_") or "_"


def reference_stats_path(cache_dir: str | Path | None, data_name: str, split: str, image_size: int,
                         feature_id: str, n: int) -> Path:
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    name = f"{_slug(data_name)}-{_slug(split)}-{image_size}px-{_slug(feature_id)}-n{n}.npz"
    return root / "fid_stats" / name


def _checked(images: ImageSource, image_size: int) -> Iterator[torch.Tensor]:
    for batch in [images] if isinstance(images, torch.Tensor) else images:
        if batch.dim() != 4 or tuple(batch.shape[-2:]) != (image_size, image_size):
            want = f"[N, C, {image_size}, {image_size}]"
            raise ValueError(f"reference images must be {want}, got {tuple(batch.shape)}")
        yield batch


def reference_stats(images: ImageSource | Callable[[], ImageSource], *, data_name: str, split: str,
                    image_size: int, feature_extractor: nn.Module, n: int,
                    cache_dir: str | Path | None = None, batch_size: int = 64,
                    device: str | torch.device | None = None, max_features: int = 10_000,
                    progress: bool = False) -> ReferenceStats:
    """Reference statistics of the first ``n`` real images, from the cache or computed once and cached.

    ``images``: uint8 ``[N, C, H, W]`` tensor, an iterable of such batches (consumed until ``n`` images),
    or a zero-argument callable returning either (so a cache hit loads no data). The features are kept in
    the cache file when ``n <= max_features``. The file lives in
    ``<cache_dir>/fid_stats/<data>-<split>-<size>px-<extractor id>-n<n>.npz``.
    """
    if n < 2:
        raise ValueError(f"n must be >= 2 reference images, got {n}")
    fid = feature_extractor_id(feature_extractor)
    path = reference_stats_path(cache_dir, data_name, split, image_size, fid, n)
    if path.is_file():
        stats = ReferenceStats.load(path)
        if stats.n != n or stats.feature_id != fid:
            raise ValueError(f"cache file {path} holds n={stats.n}, extractor {stats.feature_id!r}; "
                             f"expected n={n}, {fid!r}: delete it")
        return stats
    source = images() if callable(images) else images
    feats = extract_features(feature_extractor, _checked(source, image_size), batch_size=batch_size,
                             device=device, max_images=n, progress=progress,
                             description=f"reference {data_name}")
    if feats.shape[0] != n:
        raise ValueError(f"asked for n={n} images of {data_name}/{split}, got only {feats.shape[0]}")
    stats = ReferenceStats.from_features(feats, keep_features=n <= max_features, feature_id=fid)
    stats.save(path)
    return stats
