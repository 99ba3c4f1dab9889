"""``GenerativeMetrics``: the one entry point of the training callback and the evaluation CLI."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..config.choices import METRICS
from .classifier import CleanClassifier, classifier_logits
from .features import _module_device, _Progress, as_rgb_uint8, batch_outputs, feature_extractor_id
from .reference import FeatureStats, ReferenceStats
from .scores import (
    FID_METHODS,
    fid_from_features,
    fid_infinity,
    frechet_distance,
    inception_score,
    kernel_inception_distance,
    precision_recall,
)

Outputs = dict[str, torch.Tensor]


class GenerativeMetrics:
    """Score uint8 samples against cached reference statistics with one shared feature pass.

    ``metrics`` (any of ``METRICS``) and the keys ``compute`` returns:

    - ``"fid"`` -> ``fid``: Frechet distance of float64 statistics (``fid_method``: ``"sqrtm"``, the
      reference recipe, or ``"eigh"``, equal to round-off and much faster: see ``fid_from_features``);
    - ``"fid_inf"`` -> ``fid_inf``: FID extrapolated to infinitely many samples from subsets of the samples
      (Chong & Forsyth 2020; ``scores.fid_infinity``); needs >= 5 x the feature dimension samples
      (10,240 with Inception);
    - ``"sfid"`` -> ``sfid``: the same on the spatial features (``features.SPATIAL_LAYER``, ADM's sFID);
      needs an extractor with ``has_spatial`` and reference ``mu_s``/``sigma_s``;
    - ``"kid"`` -> ``kid_mean``, ``kid_std``: on the reference subset's features (``reference.features``);
    - ``"pr"`` -> ``precision``, ``recall``: k-NN (``pr_k``, 3 as in ADM) manifolds of all samples and the
      reference subset (ADM: 10,000 reference images);
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
                             f"(n={reference.n}) hold none (an ADM batch without arr_0, or max_features=0)")
        if "sfid" in metrics and not getattr(feature_extractor, "has_spatial", False):
            raise ValueError(f"'sfid' needs spatial features, which feature extractor "
                             f"{feature_extractor_id(feature_extractor)!r} lacks; drop sfid")
        if "sfid" in metrics and reference.mu_s is None:
            raise ValueError("'sfid' needs reference statistics with mu_s/sigma_s (the ADM layout); these have "
                             "none (computed by an older version or from an extractor without spatial features)")
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

    @property
    def outputs_id(self) -> str:
        """What ``outputs`` depends on (extractor, metrics, classifier weights): stored beside saved outputs."""
        clf = feature_extractor_id(self.classifier) if self.classifier is not None else "-"
        return f"{feature_extractor_id(self.feature_extractor)}|{','.join(sorted(self.metrics))}|{clf}"

    def outputs(self, batch: torch.Tensor) -> Outputs:
        """Per-sample features of one uint8 batch ``[N, C, H, W]`` for ``score``: ``pool`` (+ ``spatial``,
        ``logits``) from the feature extractor and ``clf_logits`` for is_clf; float32 on the CPU.

        Streaming generation keeps only these (never the images) and concatenates them in index order."""
        rgb = as_rgb_uint8(batch)
        out: Outputs = {}
        with torch.inference_mode():
            if any(m in self.metrics for m in ("fid", "fid_inf", "sfid", "kid", "pr", "is")):
                was_training = self.feature_extractor.training
                self.feature_extractor.eval()
                try:
                    device = self.device or _module_device(self.feature_extractor)
                    out = batch_outputs(self.feature_extractor, rgb.to(device))
                finally:
                    self.feature_extractor.train(was_training)
                out = {k: v for k, v in out.items()
                       if k == "pool" or (k == "spatial" and "sfid" in self.metrics)
                       or (k == "logits" and "is" in self.metrics)}
        if "is_clf" in self.metrics:
            channels = self.classifier.config["channels"]
            images = batch[:, :1] if channels == 1 and batch.shape[1] == 3 else batch
            out["clf_logits"] = classifier_logits(self.classifier, images, batch_size=self.batch_size,
                                                  device=self.device)
        return out

    def score(self, outputs: Outputs | list[Outputs], spatial_stats: FeatureStats | None = None) -> dict[str, float]:
        """Metrics from per-sample ``outputs`` (one dict, or a list of per-batch dicts in sample order).

        ``spatial_stats``: the sFID features already folded into streamed statistics (then ``outputs`` need no
        ``spatial``), so that 50k x 2023 spatial features are never held at once."""
        parts = outputs if isinstance(outputs, list) else [outputs]
        if not parts:
            raise ValueError("need >= 2 samples, got 0")
        keys = parts[0].keys()
        n = sum(len(next(iter(p.values()))) for p in parts) if keys else 0
        if n < 2:
            raise ValueError(f"need >= 2 samples, got {n}")

        def cat(key: str) -> torch.Tensor:
            return torch.cat([p[key] for p in parts])

        out: dict[str, float] = {}
        if any(m in self.metrics for m in ("fid", "fid_inf", "kid", "pr")):
            feats = cat("pool")
            if "fid" in self.metrics:
                out["fid"] = fid_from_features(feats, self.reference.mu, self.reference.sigma,
                                               method=self.fid_method)
            if "fid_inf" in self.metrics:
                out["fid_inf"], _ = fid_infinity(feats, self.reference.mu, self.reference.sigma, seed=self.seed,
                                                 method=self.fid_method)
            ref_feats = self.reference.features
            if "kid" in self.metrics:
                out["kid_mean"], out["kid_std"] = kernel_inception_distance(
                    feats, ref_feats, subsets=self.kid_subsets, subset_size=self.kid_subset_size,
                    seed=self.seed)
            if "pr" in self.metrics:
                out["precision"], out["recall"] = precision_recall(feats, ref_feats, k=self.pr_k)
            del feats
        if "sfid" in self.metrics and spatial_stats is not None:
            mu, sigma = spatial_stats.mean_cov()
            out["sfid"] = frechet_distance(mu, sigma, self.reference.mu_s, self.reference.sigma_s,
                                           method=self.fid_method)
        elif "sfid" in self.metrics:
            if n <= parts[0]["spatial"].shape[1]:  # few samples: the low-rank path avoids D x D decompositions
                out["sfid"] = fid_from_features(cat("spatial"), self.reference.mu_s, self.reference.sigma_s,
                                                method=self.fid_method)
            else:  # streamed statistics: never all 2023-d spatial features at once
                stats = FeatureStats()
                for part in parts:
                    stats.update(part["spatial"])
                mu, sigma = stats.mean_cov()
                out["sfid"] = frechet_distance(mu, sigma, self.reference.mu_s, self.reference.sigma_s,
                                               method=self.fid_method)
        if "is" in self.metrics:
            out["is_mean"], out["is_std"] = inception_score(cat("logits"), splits=min(self.is_splits, n),
                                                            seed=self.seed)
        if "is_clf" in self.metrics:
            out["is_clf_mean"], out["is_clf_std"] = inception_score(cat("clf_logits"),
                                                                    splits=min(self.is_splits, n), seed=self.seed)
        return out

    def compute(self, samples: torch.Tensor) -> dict[str, float]:
        """Metrics of uint8 samples ``[N, C, H, W]`` (C = 1 or 3, any device) against the reference."""
        as_rgb_uint8(samples)
        n = samples.shape[0]
        if n < 2:
            raise ValueError(f"need >= 2 samples, got {n}")
        bar = _Progress("sample features", n) if self.progress else None
        parts = []
        try:
            for batch in samples.split(self.batch_size):
                parts.append(self.outputs(batch))
                if bar is not None:
                    bar.advance(len(batch))
        finally:
            if bar is not None:
                bar.close()
        return self.score(parts)
