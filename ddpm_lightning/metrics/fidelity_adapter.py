"""The one place that touches torch-fidelity: its FID InceptionV3 (built empty), its TF1 bilinear resize and its
KID / precision-recall / IS functions on features we already hold.

These are torch-fidelity's module-level names, not its ``calculate_metrics`` API, so each use first checks that
the installed release is the one this adapter was written for (``WRITTEN_FOR``, the pin in ``pyproject.toml``):
another release fails with one line naming both, instead of an AttributeError or silently different numbers.
"""

from __future__ import annotations

import functools
import importlib.metadata
import io
from types import ModuleType

import torch
from torch import nn

WRITTEN_FOR = "0.4.0"


def check_version(installed: str) -> None:
    """RuntimeError unless ``installed`` is a release of the series this adapter was written for (0.4.x)."""
    if installed.split(".")[:2] != WRITTEN_FOR.split(".")[:2]:
        raise RuntimeError(f"torch-fidelity {installed} is installed, but ddpm_lightning.metrics was written for "
                           f"torch-fidelity {WRITTEN_FOR} (it calls its InceptionV3, TF1 resize and KID/PR/IS "
                           f"functions directly): pip install torch-fidelity=={WRITTEN_FOR}")


@functools.cache
def torch_fidelity() -> ModuleType:
    """The ``torch_fidelity`` package, its version checked once."""
    check_version(importlib.metadata.version("torch-fidelity"))
    import torch_fidelity

    return torch_fidelity


def inception_v3() -> nn.Module:
    """torch-fidelity's FID ``FeatureExtractorInceptionV3`` (features ``2048`` and ``logits_unbiased``), its
    weights not loaded yet (``net.load_state_dict(state)`` fills it).

    Its constructor downloads the weights, or ``torch.load``s a given file with ``weights_only=False``: it gets
    an in-memory empty state dict instead, which ``_EmptyInceptionV3.load_state_dict`` accepts."""
    torch_fidelity()
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class _EmptyInceptionV3(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
            if not state_dict:  # the constructor's own call: stay empty
                return None
            return super().load_state_dict(state_dict, strict=strict, assign=assign)

    empty = io.BytesIO()
    torch.save({}, empty)
    empty.seek(0)
    return _EmptyInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"], feature_extractor_weights_path=empty)


def resize_tf1_bilinear(x: torch.Tensor, size: int) -> torch.Tensor:
    """TensorFlow 1.x ``resize_bilinear`` (align_corners=False), as the FID Inception's reference resizes."""
    torch_fidelity()
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

    return interpolate_bilinear_2d_like_tensorflow1x(x, size=(size, size), align_corners=False)


def kid(gen: torch.Tensor, ref: torch.Tensor, *, subsets: int, subset_size: int, seed: int) -> tuple[float, float]:
    """KID mean and std over random subsets (torch-fidelity's ``kid_features_to_metric``)."""
    torch_fidelity()
    from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric

    out = kid_features_to_metric(gen, ref, kid_subsets=subsets, kid_subset_size=subset_size, rng_seed=seed,
                                 verbose=False)
    return out[KEY_METRIC_KID_MEAN], out[KEY_METRIC_KID_STD]


def precision_recall(gen: torch.Tensor, ref: torch.Tensor, *, k: int, batch_size: int) -> tuple[float, float]:
    """Improved precision and recall (torch-fidelity's ``prc_features_to_metric``)."""
    torch_fidelity()
    from torch_fidelity.metric_prc import KEY_METRIC_PRECISION, KEY_METRIC_RECALL, prc_features_to_metric

    out = prc_features_to_metric(gen, ref, prc_neighborhood=k, prc_batch_size=batch_size, save_cpu_ram=False,
                                 verbose=False)
    return out[KEY_METRIC_PRECISION], out[KEY_METRIC_RECALL]


def inception_score(logits: torch.Tensor, *, splits: int, seed: int) -> tuple[float, float]:
    """Inception Score mean and std over shuffled splits (torch-fidelity's ``isc_features_to_metric``)."""
    torch_fidelity()
    from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_features_to_metric

    out = isc_features_to_metric(logits, splits=splits, shuffle=True, rng_seed=seed)
    return out[KEY_METRIC_ISC_MEAN], out[KEY_METRIC_ISC_STD]
