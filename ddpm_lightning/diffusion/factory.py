"""``create_diffusion``: a GaussianDiffusion from the run config's ``diffusion:`` keys, which are its parameters.

The config is the constructor: ``conf/diffusion/*.yaml`` holds exactly these keys (``tests/test_diffusion_factory.py``)
and their defaults are ``config.schema.DiffusionConfig``'s. Options are checked where they are used
(``make_beta_schedule``, ``space_timesteps``, ``GaussianDiffusion``), each error naming the allowed values.
"""

from __future__ import annotations

from typing import Literal

from ..config.schema import DiffusionConfig as D
from .gaussian_diffusion import GaussianDiffusion, LossType, MeanType, VarType
from .schedules import make_beta_schedule, space_timesteps


def create_diffusion(
    schedule: Literal["linear", "cosine"] = D.schedule,
    num_timesteps: int = D.num_timesteps,
    mean_type: MeanType = D.mean_type,
    var_type: VarType = D.var_type,
    loss_type: LossType = D.loss_type,
    hybrid_lambda: float = D.hybrid_lambda,
    rescale_vlb: bool = D.rescale_vlb,
    timestep_respacing: str | int | None = D.timestep_respacing,
    loss_weighting: Literal["none", "min_snr", "p2"] = D.loss_weighting,
    min_snr_gamma: float = D.min_snr_gamma,
    p2_k: float = D.p2_k,
    p2_gamma: float = D.p2_gamma,
    input_perturbation: float = D.input_perturbation,
    immiscible: bool = D.immiscible,
) -> GaussianDiffusion:
    """The ``num_timesteps``-step process with the ``schedule`` betas, trained on the steps
    ``space_timesteps(num_timesteps, timestep_respacing)`` keeps (None: all), the rest as ``GaussianDiffusion``."""
    num_timesteps = int(num_timesteps)
    return GaussianDiffusion(
        make_beta_schedule(schedule, num_timesteps),
        mean_type=mean_type,
        var_type=var_type,
        loss_type=loss_type,
        hybrid_lambda=float(hybrid_lambda),
        rescale_vlb=bool(rescale_vlb),
        use_timesteps=space_timesteps(num_timesteps, timestep_respacing) if timestep_respacing else None,
        loss_weighting=loss_weighting,
        min_snr_gamma=min_snr_gamma,
        p2_k=p2_k,
        p2_gamma=p2_gamma,
        input_perturbation=input_perturbation,
        immiscible=immiscible,
    )
