"""Reference statistics of real data: computed once, cached on disk as float64 ``.npz``.

A cache entry is keyed by (data set name, split, image size, feature extractor id, n) and holds ``mu``
and ``sigma`` in float64 (and ``mu_s``/``sigma_s`` of the sFID spatial features when the extractor has
them), accumulated over a stream of batches so that n can be the whole data set (50k+) in bounded memory,
plus the pool features of the first ``min(n, max_features)`` images in float32 (KID and precision/recall
use them: the ADM protocol's 10,000-image reference subset). The layout is the ADM evaluator's reference
batch (``mu``, ``sigma``, ``mu_s``, ``sigma_s``); ``write_adm_reference`` adds its ``arr_0`` images and
``read_adm_reference`` scores against an official one. Files are written atomically (``artifacts.atomic_write``)
and read with ``allow_pickle=False``.
"""

from __future__ import annotations

import os
import re
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..artifacts import atomic_write
from .features import feature_extractor_id, iter_outputs
from .npz import iter_npz_rows, npz_member

ImageSource = torch.Tensor | Iterable[torch.Tensor]


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/ddpm_lightning`` (``~/.cache/ddpm_lightning`` when unset)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "ddpm_lightning"


class FeatureStats:
    """Mean and covariance of a stream of feature batches in float64, in bounded memory (D x D sums).

    Sums are taken around the first batch's mean (``shift``) so the covariance keeps its precision. Batching
    changes the result only by float64 round-off; the same batches in the same order give bit-equal results.
    """

    def __init__(self) -> None:
        self.n = 0
        self._shift: torch.Tensor | None = None
        self._sum: torch.Tensor | None = None
        self._outer: torch.Tensor | None = None

    def update(self, features: torch.Tensor | np.ndarray) -> None:
        x = torch.as_tensor(features).detach().cpu().double()
        if x.dim() != 2 or x.shape[0] == 0:
            raise ValueError(f"expected features [N >= 1, D], got {tuple(x.shape)}")
        if self._shift is None:
            self._shift = x.mean(0)
            self._sum = torch.zeros_like(self._shift)
            self._outer = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64)
        elif x.shape[1] != self._shift.shape[0]:
            raise ValueError(f"features of dim {x.shape[1]} after dim {self._shift.shape[0]}")
        centred = x - self._shift
        self._sum += centred.sum(0)
        self._outer += centred.T @ centred
        self.n += x.shape[0]

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        if self.n < 2:
            raise ValueError(f"need >= 2 feature rows for a covariance, got {self.n}")
        mean_c = self._sum / self.n
        cov = (self._outer - self.n * torch.outer(mean_c, mean_c)) / (self.n - 1)
        return (mean_c + self._shift).numpy(), cov.numpy()


@dataclass(frozen=True, eq=False)
class ReferenceStats:
    """Float64 mean/covariance of ``n`` reference features (``mu_s``/``sigma_s``: the sFID spatial ones), and
    the float32 pool features of a reference subset (the first ``min(n, max_features)`` images) when kept."""

    mu: np.ndarray
    sigma: np.ndarray
    n: int
    features: np.ndarray | None = None
    feature_id: str = ""
    mu_s: np.ndarray | None = None
    sigma_s: np.ndarray | None = None

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
        if self.mu_s is not None:
            arrays["mu_s"], arrays["sigma_s"] = self.mu_s.astype(np.float64), self.sigma_s.astype(np.float64)

        atomic_write(path, lambda handle: np.savez(handle, **arrays))

    @classmethod
    def load(cls, path: str | Path) -> ReferenceStats:
        with np.load(Path(path), allow_pickle=False) as data:
            spatial = "mu_s" in data.files
            return cls(mu=data["mu"], sigma=data["sigma"], n=int(data["n"]),
                       features=data["features"] if "features" in data.files else None,
                       feature_id=str(data["feature_id"]), mu_s=data["mu_s"] if spatial else None,
                       sigma_s=data["sigma_s"] if spatial else None)


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
                    progress: bool = False, need_spatial: bool | None = None,
                    image_range: Callable[[int, int], ImageSource] | None = None, rank: int = 0,
                    world_size: int = 1, chunk: int = 1024) -> ReferenceStats:
    """Reference statistics of the first ``n`` real images, from the cache or computed once and cached.

    ``images``: uint8 ``[N, C, H, W]`` tensor, an iterable of such batches (consumed until ``n`` images,
    one batch at a time: the images are never all held), or a zero-argument callable returning either (so a
    cache hit loads no data). The pool features of the first ``min(n, max_features)`` images are kept for
    KID and precision/recall; the statistics cover all ``n``. The file lives in
    ``<cache_dir>/fid_stats/<data>-<split>-<size>px-<extractor id>-n<n>.npz``; an entry written by an older
    version is recomputed when it lacks what is asked: fewer kept features, or no spatial statistics while
    ``need_spatial`` (default: whenever the extractor has spatial features; sFID needs them).

    Several processes (``world_size`` > 1, ``torch.distributed`` initialised; every rank calls this with the
    same arguments): rank 0's cache decides for all. On a miss the feature pass is shared: the images are cut
    into blocks of ``chunk`` (rounded up to a multiple of ``batch_size``) read with ``image_range(start, end)``,
    rank r featurises blocks k with k % world_size == r, and rank 0 folds the gathered features block by block
    in index order, batch by batch: the float64 statistics are bit-equal to one process's (same batches, same
    order) and no process waits for the whole pass at one collective. Every rank returns the statistics.
    """
    if n < 2:
        raise ValueError(f"n must be >= 2 reference images, got {n}")
    if max_features < 0:
        raise ValueError(f"max_features must be >= 0, got {max_features}")
    fid = feature_extractor_id(feature_extractor)
    path = reference_stats_path(cache_dir, data_name, split, image_size, fid, n)
    keep = min(n, max_features)
    if need_spatial is None:
        need_spatial = getattr(feature_extractor, "has_spatial", False)
    cached = _cached(path, n, fid, keep, need_spatial) if rank == 0 else None
    if world_size > 1:
        cached = _broadcast(cached)
        if cached is not None:
            return cached
        if image_range is None:  # no random access to the images: rank 0 computes, the others receive
            stats = _compute(images, data_name=data_name, image_size=image_size, extractor=feature_extractor, n=n,
                             keep=keep, fid=fid, path=path, batch_size=batch_size, device=device,
                             progress=progress) if rank == 0 else None
            return _broadcast(stats)
        return _broadcast(_compute_sharded(
            image_range, data_name=data_name, image_size=image_size, extractor=feature_extractor, n=n, keep=keep,
            fid=fid, path=path, batch_size=batch_size, device=device, progress=progress, rank=rank,
            world_size=world_size, chunk=chunk))
    if cached is not None:
        return cached
    return _compute(images, data_name=data_name, image_size=image_size, extractor=feature_extractor, n=n, keep=keep,
                    fid=fid, path=path, batch_size=batch_size, device=device, progress=progress)


def _cached(path: Path, n: int, fid: str, keep: int, need_spatial: bool) -> ReferenceStats | None:
    if not path.is_file():
        return None
    stats = ReferenceStats.load(path)
    if stats.n != n or stats.feature_id != fid:
        raise ValueError(f"cache file {path} holds n={stats.n}, extractor {stats.feature_id!r}; "
                         f"expected n={n}, {fid!r}: delete it")
    kept = 0 if stats.features is None else len(stats.features)
    spatial_ok = stats.mu_s is not None or not need_spatial
    if kept >= keep and spatial_ok:
        return stats if kept == keep else replace(stats, features=stats.features[:keep])
    return None


def _broadcast(value):
    """Rank 0's ``value`` on every rank (``torch.distributed``)."""
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


class _Accumulator:
    """Streamed float64 statistics of pool (+ spatial) features and the first ``keep`` pool features."""

    def __init__(self, keep: int) -> None:
        self.pool, self.spatial, self.keep, self.kept = FeatureStats(), FeatureStats(), keep, []

    def update(self, out: dict[str, torch.Tensor]) -> None:
        self.pool.update(out["pool"])
        if "spatial" in out:
            self.spatial.update(out["spatial"])
        room = self.keep - sum(len(f) for f in self.kept)
        if room > 0:
            self.kept.append(out["pool"][:room].numpy())

    def result(self, n: int, fid: str, path: Path, what: str) -> ReferenceStats:
        if self.pool.n != n:
            raise ValueError(f"asked for n={n} images of {what}, got only {self.pool.n}")
        mu, sigma = self.pool.mean_cov()
        mu_s, sigma_s = self.spatial.mean_cov() if self.spatial.n else (None, None)
        stats = ReferenceStats(mu=mu, sigma=sigma, n=n, feature_id=fid, mu_s=mu_s, sigma_s=sigma_s,
                               features=np.concatenate(self.kept).astype(np.float32) if self.keep else None)
        stats.save(path)
        return stats


def _compute(images, *, data_name: str, image_size: int, extractor: nn.Module, n: int, keep: int, fid: str,
             path: Path, batch_size: int, device, progress: bool) -> ReferenceStats:
    source = images() if callable(images) else images
    acc = _Accumulator(keep)
    for out in iter_outputs(extractor, _checked(source, image_size), batch_size=batch_size, device=device,
                            max_images=n, progress=progress, description=f"reference {data_name}"):
        acc.update(out)
    return acc.result(n, fid, path, f"{data_name}/{path.name}")


def _compute_sharded(image_range: Callable[[int, int], ImageSource], *, data_name: str, image_size: int,
                     extractor: nn.Module, n: int, keep: int, fid: str, path: Path, batch_size: int, device,
                     progress: bool, rank: int, world_size: int, chunk: int) -> ReferenceStats | None:
    chunk = -(-max(chunk, batch_size) // batch_size) * batch_size  # whole batches: one process's batches
    blocks = [(s, min(s + chunk, n)) for s in range(0, n, chunk)]
    acc = _Accumulator(keep) if rank == 0 else None
    for first in range(0, len(blocks), world_size):
        mine = first + rank
        outs: list[dict[str, torch.Tensor]] = []
        if mine < len(blocks):
            start, end = blocks[mine]
            outs = list(iter_outputs(extractor, _checked(image_range(start, end), image_size),
                                     batch_size=batch_size, device=device, max_images=end - start,
                                     progress=progress and rank == 0,
                                     description=f"reference {data_name} (rank 0 of {world_size})"))
            if sum(len(o["pool"]) for o in outs) != end - start:
                raise ValueError(f"asked for images {start}..{end - 1} of {data_name}, got "
                                 f"{sum(len(o['pool']) for o in outs)}")
        gathered: list | None = [None] * world_size if rank == 0 else None
        torch.distributed.gather_object(outs, gathered, dst=0)
        if rank == 0:
            for block_outs in gathered:  # ranks in order = blocks in index order
                for out in block_outs:
                    acc.update(out)
    return acc.result(n, fid, path, f"{data_name}/{path.name}") if rank == 0 else None


def read_adm_reference(path: str | Path, feature_extractor: nn.Module, *, cache_dir: str | Path | None = None,
                       batch_size: int = 64, device: str | torch.device | None = None,
                       max_features: int = 10_000, progress: bool = False, rank: int = 0,
                       world_size: int = 1) -> ReferenceStats:
    """An ADM evaluator reference batch (``VIRTUAL_imagenet64_labeled.npz``: ``mu``, ``sigma``, ``mu_s``,
    ``sigma_s``, ``arr_0`` images) as ``ReferenceStats``: its statistics as stored, the pool features of its
    first ``max_features`` ``arr_0`` images (KID, precision/recall) computed once and cached.

    A file written by ``write_adm_reference`` names its feature extractor (``feature_id``), which must be
    ``feature_extractor``'s; an official file (no ``feature_id``) needs the FID Inception.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"reference batch {path} does not exist")
    fid = feature_extractor_id(feature_extractor)
    try:
        with np.load(path, allow_pickle=False) as data:
            files = set(data.files)
            if not {"mu", "sigma"} <= files:
                raise ValueError(f"reference={path} is not an ADM reference batch: it has {sorted(files)}, "
                                 f"expected mu, sigma (and mu_s, sigma_s, arr_0)")
            stored = {k: data[k] for k in ("mu", "sigma", "mu_s", "sigma_s", "feature_id", "n") if k in files}
        shape, dtype = npz_member(path, "arr_0") if "arr_0" in files else (None, None)  # arr_0: streamed
    except (OSError, EOFError, zipfile.BadZipFile) as error:
        raise ValueError(f"reference={path} is not a readable .npz ({error})") from None
    for key in ("mu", "sigma", "mu_s", "sigma_s"):  # a NaN here would score every model as FID nan
        if key in stored and not np.isfinite(stored[key]).all():
            raise ValueError(nonfinite_reference_message(path, key, int((~np.isfinite(stored[key])).sum())))
    owner = str(stored.get("feature_id", ""))
    if owner and owner != fid:
        raise ValueError(f"reference={path} was computed with feature extractor {owner!r}, not {fid!r}")
    if not owner and not fid.startswith("inception-2015-12-05"):
        raise ValueError(f"reference={path} is an official ADM batch (TF FID Inception statistics): it needs "
                         f"feature=inception, not {fid!r}")
    features = None
    if shape is not None and max_features > 0:
        if dtype != np.uint8 or len(shape) != 4 or shape[-1] not in (1, 3) or shape[1] != shape[2]:
            raise ValueError(f"reference={path}: arr_0 must be uint8 [N, H, W, 3], got {dtype} {shape}")
        n = min(shape[0], max_features)

        def image_range(start: int, end: int) -> Iterator[torch.Tensor]:
            for rows in iter_npz_rows(path, "arr_0", 256, start, end):
                yield torch.from_numpy(rows.copy()).permute(0, 3, 1, 2)

        subset = reference_stats(lambda: image_range(0, n), data_name=f"adm-{path.stem}-{path.stat().st_size}B",
                                 split="arr_0", image_size=shape[1], feature_extractor=feature_extractor, n=n,
                                 cache_dir=cache_dir, batch_size=batch_size, device=device, max_features=n,
                                 progress=progress, image_range=image_range, rank=rank, world_size=world_size)
        features = subset.features
    spatial = "mu_s" in stored and "sigma_s" in stored
    return ReferenceStats(mu=stored["mu"].astype(np.float64), sigma=stored["sigma"].astype(np.float64),
                          n=int(stored["n"]) if "n" in stored else (shape[0] if shape is not None else 0),
                          features=features, feature_id=fid,
                          mu_s=stored["mu_s"].astype(np.float64) if spatial else None,
                          sigma_s=stored["sigma_s"].astype(np.float64) if spatial else None)


def nonfinite_reference_message(path: str | Path, key: str, count: int) -> str:
    return (f"reference={path}: {key} holds {count} non-finite value(s) (NaN or inf), so every score against it "
            f"would be nan; use another reference batch, or write one from the data set (ddpm-eval data=<name> "
            f"write_reference=<path.npz>)")


def write_adm_reference(path: str | Path, stats: ReferenceStats, images: ImageSource, num_images: int,
                        image_size: int) -> Path:
    """Write ``stats`` in the ADM evaluator's reference-batch layout: ``mu``, ``sigma``, ``mu_s``, ``sigma_s``
    (float64), ``arr_0`` (the first ``num_images`` uint8 images, NHWC, 3 channels: 1-channel data repeated),
    plus ``feature_id`` and ``n`` (ignored by the official evaluator). Streamed, written atomically."""
    from .npz import write_npz

    if stats.mu_s is None:
        raise ValueError(f"the reference statistics have no sFID part (feature extractor {stats.feature_id!r} "
                         f"has no spatial features)")

    def rgb_batches() -> Iterator[np.ndarray]:
        left = num_images
        for batch in [images] if isinstance(images, torch.Tensor) else images:
            if left <= 0:
                break
            batch = batch[:left]
            left -= len(batch)
            yield hwc3(batch)

    size = (image_size, image_size)
    arrays = {"mu": stats.mu, "sigma": stats.sigma, "mu_s": stats.mu_s, "sigma_s": stats.sigma_s,
              "n": np.int64(stats.n), "feature_id": np.str_(stats.feature_id),
              "arr_0": ((num_images, *size, 3), np.uint8, rgb_batches())}
    return write_npz(Path(path), arrays)


def hwc3(images: torch.Tensor) -> np.ndarray:
    """uint8 ``[N, C, H, W]`` (C = 1 or 3) -> ``[N, H, W, 3]`` numpy: the ADM evaluator reads 3 channels."""
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected uint8 images [N, 1 or 3, H, W], got {images.dtype} {tuple(images.shape)}")
    return images.expand(-1, 3, -1, -1).permute(0, 2, 3, 1).contiguous().cpu().numpy()
