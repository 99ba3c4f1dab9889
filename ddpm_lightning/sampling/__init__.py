"""Sampling without Lightning: ``sample_images`` over any network and GaussianDiffusion."""

from .grid import save_grid
from .sample import (
    SAMPLE_METHODS,
    SAMPLE_SCHEDULES,
    ClassifierFreeGuidance,
    check_sampling_options,
    sample_images,
    sample_loop,
    sampling_overrides,
    sampling_process,
)

__all__ = ["sample_images", "sampling_process", "sample_loop", "ClassifierFreeGuidance", "SAMPLE_METHODS",
           "SAMPLE_SCHEDULES", "check_sampling_options", "sampling_overrides", "save_grid"]
