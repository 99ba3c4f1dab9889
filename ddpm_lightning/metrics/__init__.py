"""Sample-quality metrics in pure torch (no Lightning, Hydra, OmegaConf or wandb).

FID / KID / precision-recall on the standard FID InceptionV3 (or any pluggable feature module), IS from
Inception logits when available, a classifier-based IS (``is_clf``), reference statistics cached on disk,
and ``GenerativeMetrics`` as the single entry point::

    extractor = load_feature_extractor("inception")
    ref = reference_stats(lambda: real_uint8, data_name="animal_mnist", split="train", image_size=32,
                          feature_extractor=extractor, n=2000)
    scores = GenerativeMetrics(extractor, ref, ("fid", "kid", "pr")).compute(to_uint8(samples))
"""

from ..pixels import to_uint8  # the owner of the uint8 <-> [-1, 1] conversion
from .classifier import (
    CleanClassifier,
    cached_clean_classifier,
    classifier_logits,
    classify,
    clean_classifier_path,
    load_classifier,
    save_classifier,
    train_clean_classifier,
)
from .factory import make_generative_metrics, reference_batches
from .features import (
    FEATURE_EXTRACTORS,
    RESIZE_MODES,
    SPATIAL_LAYER,
    InceptionFeatureExtractor,
    TinyFeatureExtractor,
    extract_features,
    feature_extractor_id,
    fid_helper_weights_path,
    iter_outputs,
    load_feature_extractor,
    torch_fidelity_weights_path,
)
from .generative import METRICS, GenerativeMetrics
from .npz import write_npz
from .reference import (
    FeatureStats,
    ReferenceStats,
    default_cache_dir,
    hwc3,
    read_adm_reference,
    reference_stats,
    reference_stats_path,
    write_adm_reference,
)
from .scores import (
    FID_METHODS,
    fid_from_features,
    frechet_distance,
    inception_score,
    kernel_inception_distance,
    metric_name,
    precision_recall,
)

__all__ = [
    "GenerativeMetrics", "METRICS", "make_generative_metrics", "reference_batches",
    "ReferenceStats", "reference_stats", "reference_stats_path", "FeatureStats",
    "read_adm_reference", "write_adm_reference", "hwc3", "write_npz", "iter_outputs", "SPATIAL_LAYER",
    "default_cache_dir", "load_feature_extractor", "InceptionFeatureExtractor", "TinyFeatureExtractor",
    "extract_features", "feature_extractor_id", "fid_helper_weights_path", "torch_fidelity_weights_path",
    "to_uint8", "FEATURE_EXTRACTORS", "RESIZE_MODES", "frechet_distance", "fid_from_features",
    "kernel_inception_distance", "precision_recall", "inception_score", "metric_name", "FID_METHODS",
    "CleanClassifier", "train_clean_classifier", "classify", "classifier_logits", "save_classifier",
    "load_classifier", "cached_clean_classifier", "clean_classifier_path",
]
