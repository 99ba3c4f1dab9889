"""Scoring against a data set: ``make_generative_metrics`` builds ``GenerativeMetrics`` for a DataModule's real
images (cached reference statistics, cached clean classifier for ``is_clf``), for the in-loop callback and
``ddpm-eval`` alike. The DataModule is duck-typed (``split_indices``, ``source``, ``name``, ``image_size``, ...):
no Lightning here.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from .classifier import cached_clean_classifier
from .features import load_feature_extractor
from .generative import GenerativeMetrics
from .reference import read_adm_reference, reference_stats

log = logging.getLogger(__name__)

CLASSIFIER_IMAGES = 10_000  # is_clf on a source decoded from files trains on this many training images
def reference_batches(datamodule, split: str, n: int, chunk: int = 256, start: int = 0) -> Iterator[torch.Tensor]:
    """Images ``start..n-1`` of ``split`` (``reference_images``' order) decoded ``chunk`` at a time."""
    indices = datamodule.split_indices(split)[start:n]
    for start in range(0, len(indices), chunk):
        yield datamodule.source.get(indices[start:start + chunk])


def classifier_data(datamodule, max_images: int = CLASSIFIER_IMAGES) -> tuple[torch.Tensor, torch.Tensor]:
    """Images and labels the clean classifier (is_clf) trains on: every training image of an in-memory source,
    the first ``max_images`` of a source decoded from files (an image folder)."""
    if datamodule.source.in_memory:
        return datamodule.train_tensors()
    n = min(max_images, len(datamodule.split_indices("train")))
    return datamodule.reference_images("train", n), datamodule.reference_labels("train", n)


def make_generative_metrics(datamodule, *, metrics: Sequence[str] = ("fid", "kid", "pr"), feature: str = "inception",
                            weights_path: str | None = None, reference_split: str = "train",
                            reference_n: int = 2000, pr_reference_n: int = 10_000, reference: str | None = None,
                            cache_dir: str | None = None, classifier_epochs: int = 5,
                            batch_size: int = 64, device: str | torch.device = "cpu",
                            progress: bool = False, log: Callable[[str], Any] = log.info, rank: int = 0,
                            world_size: int = 1) -> GenerativeMetrics:
    """GenerativeMetrics for ``datamodule``'s real images (cached statistics, cached clean classifier).

    Statistics (FID, sFID) cover ``reference_n`` images (up to the whole split), streamed; KID and
    precision/recall use the first ``pr_reference_n`` of them (ADM: 10,000). ``reference``: an ADM evaluator
    reference batch (``.npz`` with ``mu``/``sigma``/``mu_s``/``sigma_s``/``arr_0``) to score against instead.
    ``log`` says what is computed the first time (minutes on CPU): Lightning's ``rank_zero_info`` under DDP.

    Under ``torch.distributed`` (``world_size`` > 1) every rank calls this at once: the reference feature pass
    is shared by the ranks (``reference_stats``: the same statistics as one process, no rank idle at a
    barrier for the whole pass), the clean classifier (is_clf) is trained by rank 0 and read by the others.
    """
    metrics = tuple(metrics)
    if pr_reference_n < 0:
        raise ValueError(f"pr_reference_n must be >= 0, got {pr_reference_n}")
    extractor = load_feature_extractor(feature, weights_path, device=device)
    if datamodule is None and not reference:
        raise ValueError("scoring needs the data set (data=<name>) or an ADM reference batch (reference=<.npz>)")
    if reference:
        ref = read_adm_reference(reference, extractor, cache_dir=cache_dir, batch_size=batch_size, device=device,
                                 max_features=pr_reference_n, progress=progress, rank=rank, world_size=world_size)
    else:
        available = len(datamodule.split_indices(reference_split))
        n = min(int(reference_n), available)
        log(f"scoring setup: {feature} statistics of {n} real {datamodule.name} images (computed once per "
            f"data set, then read from the cache {cache_dir})")  # minutes on CPU the first time: say so
        ref = reference_stats(lambda: reference_batches(datamodule, reference_split, n),
                              data_name=datamodule.name, split=reference_split,
                              image_size=datamodule.image_size, feature_extractor=extractor, n=n,
                              cache_dir=cache_dir, batch_size=batch_size, device=device,
                              max_features=pr_reference_n, progress=progress, need_spatial="sfid" in metrics,
                              image_range=lambda start, end: reference_batches(datamodule, reference_split, end,
                                                                               start=start),
                              rank=rank, world_size=world_size)
    classifier = None
    if "is_clf" in metrics:
        if datamodule is None:
            raise ValueError("is_clf trains a classifier on the data set: pass data=<name> or drop is_clf")
        if not datamodule.num_classes:
            raise ValueError(f"is_clf needs a labelled data set; {datamodule.name} has no labels: drop is_clf")
        log(f"scoring setup: clean classifier for is_clf ({classifier_epochs} epochs on "
            f"{datamodule.name}, trained once per data set, then read from the cache)")

        def clean_classifier():
            return cached_clean_classifier(lambda: classifier_data(datamodule), data_name=datamodule.name,
                                           image_size=datamodule.image_size, num_classes=datamodule.num_classes,
                                           cache_dir=cache_dir, epochs=classifier_epochs, device=device)

        if rank == 0:  # rank 0 trains it once (cached), the other ranks then read the cache
            classifier = clean_classifier()
        if world_size > 1:
            torch.distributed.barrier()
        if rank != 0:
            classifier = clean_classifier()
    return GenerativeMetrics(extractor, ref, metrics, classifier=classifier, batch_size=batch_size,
                             device=device, progress=progress)
