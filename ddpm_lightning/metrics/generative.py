"""``GenerativeMetrics``: the one entry point of the training callback and the evaluation CLI."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .classifier import CleanClassifier, classifier_logits
from .features import as_rgb_uint8, extract_features, feature_extractor_id
from .reference import ReferenceStats
from .scores import (
    FID_METHODS,
    fid_from_features,
    inception_score,
    kernel_inception_distance,
    precision_recall,
)

METRICS = ("fid", "kid", "pr", "is", "is_clf")


class GenerativeMetrics:
    """Score uint8 samples against cached reference statistics with one shared feature pass.

    ``metrics`` (any of ``METRICS``) and the keys ``compute`` returns:

    - ``"fid"`` -> ``fid``: Frechet distance of float64 statistics (``fid_method``: ``"sqrtm"``, the
      reference recipe, or ``"eigh"``, equal to round-off and much faster: see ``fid_from_features``);
    - ``"kid"`` -> ``kid_mean``, ``kid_std``: needs the reference features (kept in the cache for small n);
    - ``"pr"`` -> ``precision``, ``recall``: k-NN (``pr_k``) manifolds, also on reference features;
    - ``"is"`` -> ``is_mean``, ``is_std``: Inception Score; needs an extractor with 1008-way logits
      (torch-fidelity's weights), which the offline fid-helper network lacks;
    - ``"is_clf"`` -> ``is_clf_mean``, ``is_clf_std``: the same formula on ``classifier``'s logits.

    KID uses subsets of ``min(kid_subset_size, n_samples, n_reference)`` images; IS splits the samples into
    ``is_splits`` parts (at most the number of samples). All randomness is seeded by ``seed``.
    """

    def __init__(self, feature_extractor: nn.Module, reference: ReferenceStats,
                 metrics: Sequence[str] = ("fid", "kid", "pr"), *, classifier: CleanClassifier | None = None,
                 batch_size: int = 64, device: str | torch.device | None = None, fid_method: str = "eigh",
                 kid_subsets: int = 100, kid_subset_size: int = 1000, pr_k: int = 3, is_splits: int = 10,
                 seed: int = 0, progress: bool = False) -> None:
        metrics = tuple(metrics)
        unknown = [m for m in metrics if m not in METRICS]
        if unknown or not metrics:
            raise ValueError(f"unknown metrics {unknown or metrics!r}; allowed: {', '.join(METRICS)}")
        if fid_method not in FID_METHODS:
            raise ValueError(f"unknown fid_method {fid_method!r}; allowed: {', '.join(FID_METHODS)}")
        if reference.feature_id and reference.feature_id != feature_extractor_id(feature_extractor):
            raise ValueError(f"reference stats come from feature extractor {reference.feature_id!r}, not "
                             f"{feature_extractor_id(feature_extractor)!r}")
        needs_features = [m for m in metrics if m in ("kid", "pr")]
        if needs_features and reference.features is None:
            raise ValueError(f"{', '.join(needs_features)} need reference features, but the reference stats "
                             f"(n={reference.n}) were cached without them; use a smaller n")
        if "is" in metrics and not getattr(feature_extractor, "has_logits", False):
            raise ValueError("'is' needs Inception logits, which this feature extractor lacks (the offline "
                             "fid-helper network has none; torch-fidelity's weights have them); use 'is_clf'")
        if "is_clf" in metrics and classifier is None:
            raise ValueError("'is_clf' needs a classifier= (see cached_clean_classifier)")
        self.device = torch.device(device) if device is not None else None
        if self.device is not None:
            feature_extractor = feature_extractor.to(self.device)
            classifier = classifier.to(self.device) if classifier is not None else None
        self.feature_extractor, self.classifier = feature_extractor, classifier
        self.reference = reference
        self.metrics = metrics
        self.batch_size = batch_size
        self.fid_method = fid_method
        self.kid_subsets, self.kid_subset_size = kid_subsets, kid_subset_size
        self.pr_k, self.is_splits, self.seed = pr_k, is_splits, seed
        self.progress = progress

    def compute(self, samples: torch.Tensor) -> dict[str, float]:
        """Metrics of uint8 samples ``[N, C, H, W]`` (C = 1 or 3, any device) against the reference."""
        as_rgb_uint8(samples)
        n = samples.shape[0]
        if n < 2:
            raise ValueError(f"need >= 2 samples, got {n}")
        out: dict[str, float] = {}
        if any(m in self.metrics for m in ("fid", "kid", "pr", "is")):
            feats, logits = extract_features(self.feature_extractor, samples, batch_size=self.batch_size,
                                             device=self.device, with_logits=True, progress=self.progress,
                                             description="sample features")
            if "fid" in self.metrics:
                out["fid"] = fid_from_features(feats, self.reference.mu, self.reference.sigma,
                                               method=self.fid_method)
            ref_feats = self.reference.features
            if "kid" in self.metrics:
                out["kid_mean"], out["kid_std"] = kernel_inception_distance(
                    feats, ref_feats, subsets=self.kid_subsets, subset_size=self.kid_subset_size,
                    seed=self.seed)
            if "pr" in self.metrics:
                out["precision"], out["recall"] = precision_recall(feats, ref_feats, k=self.pr_k)
            if "is" in self.metrics:
                out["is_mean"], out["is_std"] = inception_score(logits, splits=min(self.is_splits, n),
                                                                seed=self.seed)
        if "is_clf" in self.metrics:
            logits = classifier_logits(self.classifier, samples, batch_size=self.batch_size,
                                       device=self.device)
            out["is_clf_mean"], out["is_clf_std"] = inception_score(logits, splits=min(self.is_splits, n),
                                                                    seed=self.seed)
        return out
