"""Sampling without Lightning: ``sample_images`` over any network and GaussianDiffusion."""

from .sample import SAMPLE_METHODS, ClassifierFreeGuidance, sample_images, sampling_process

__all__ = ["sample_images", "sampling_process", "ClassifierFreeGuidance", "SAMPLE_METHODS"]
