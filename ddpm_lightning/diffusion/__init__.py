"""Gaussian diffusion math in pure torch (no Lightning, Hydra, OmegaConf or wandb)."""

from .factory import create_diffusion
from .gaussian_diffusion import LOSS_TYPES, MEAN_TYPES, VAR_TYPES, GaussianDiffusion
from .likelihood import (
    approx_standard_normal_cdf,
    discretized_gaussian_log_likelihood,
    mean_flat,
    normal_kl,
)
from .quartiles import NUM_QUARTILES, quartile_means, stratified_timesteps, timestep_quartile, vb_by_quartile
from .schedules import SCHEDULES, make_beta_schedule, respace_betas, space_timesteps
from .timestep_samplers import (
    SAMPLERS,
    LossSecondMomentResampler,
    ScheduleSampler,
    UniformSampler,
    create_named_schedule_sampler,
)

LossAwareSampler = LossSecondMomentResampler

__all__ = [
    "GaussianDiffusion", "create_diffusion", "make_beta_schedule", "space_timesteps", "respace_betas", "normal_kl",
    "discretized_gaussian_log_likelihood", "approx_standard_normal_cdf", "mean_flat",
    "ScheduleSampler", "UniformSampler", "LossSecondMomentResampler", "LossAwareSampler",
    "create_named_schedule_sampler", "MEAN_TYPES", "VAR_TYPES", "LOSS_TYPES", "SCHEDULES", "SAMPLERS",
    "NUM_QUARTILES", "quartile_means", "timestep_quartile", "stratified_timesteps", "vb_by_quartile",
]

from .guidance import (  # noqa: E402
    GUIDANCE_INFO_KEYS,
    IgnoreLabels,
    build_guidance,
    check_classifier_compatible,
    classifier_cond_fn,
    drop_labels_to_null,
    noisy_classifier_losses,
)

__all__ += ["classifier_cond_fn", "check_classifier_compatible", "build_guidance", "GUIDANCE_INFO_KEYS",
            "IgnoreLabels", "noisy_classifier_losses", "drop_labels_to_null"]

from .noise import PerSampleNoise, generator_noise, sample_seed  # noqa: E402
from .samplers import (  # noqa: E402
    CORRECTORS,
    SOLVER_SCHEDULES,
    multistep_step_fn,
    sample_loop_progressive,
    solver_timesteps,
)

__all__ += ["PerSampleNoise", "sample_seed", "generator_noise", "SOLVER_SCHEDULES", "CORRECTORS",
            "multistep_step_fn", "sample_loop_progressive", "solver_timesteps"]
