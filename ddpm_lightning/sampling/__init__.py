"""Sampling without Lightning: ``sample_images`` over any network and GaussianDiffusion, with the sampler settings
as one object (``SampleConfig``, resolved once by ``resolve_sampler``) and guidance as another (``Guidance``)."""

from .grid import save_grid
from .guidance import AutoGuidance, ClassifierFreeGuidance, Guidance
from .sample import SAMPLE_METHODS, SAMPLE_SCHEDULES, resolve_sampler, sample_images, sampling_process

__all__ = ["sample_images", "sampling_process", "resolve_sampler", "Guidance", "ClassifierFreeGuidance", "AutoGuidance",
           "SAMPLE_METHODS", "SAMPLE_SCHEDULES", "save_grid"]
