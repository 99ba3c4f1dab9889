"""The config is the constructor: every ``conf/diffusion/*.yaml`` holds exactly ``create_diffusion``'s parameters,
with ``DiffusionConfig``'s defaults, and each bad option names the allowed values."""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path

import pytest
import torch
from run_config import compose_run

from ddpm_lightning.config import CONFIG_DIR
from ddpm_lightning.config.schema import DiffusionConfig
from ddpm_lightning.diffusion import GaussianDiffusion, create_diffusion, make_beta_schedule, space_timesteps

PARAMETERS = inspect.signature(create_diffusion).parameters


@pytest.mark.parametrize("name", sorted(p.stem for p in (Path(CONFIG_DIR) / "diffusion").glob("*.yaml")))
def test_every_diffusion_config_holds_exactly_the_factory_parameters(name, tmp_path):
    cfg = compose_run([f"diffusion={name}"], tmp_path)
    assert set(cfg.diffusion) == set(PARAMETERS)
    assert isinstance(create_diffusion(**cfg.diffusion), GaussianDiffusion)


def test_the_schema_fields_are_the_factory_parameters_with_the_same_defaults():
    schema = {field.name: field.default for field in dataclasses.fields(DiffusionConfig)}
    assert schema == {name: parameter.default for name, parameter in PARAMETERS.items()}


def test_create_diffusion_is_the_process_the_keys_describe():
    diffusion = create_diffusion(schedule="cosine", num_timesteps=100, timestep_respacing="ddim10",
                                 var_type="learned_range", loss_type="hybrid", loss_weighting="min_snr")
    reference = GaussianDiffusion(make_beta_schedule("cosine", 100), var_type="learned_range", loss_type="hybrid",
                                  use_timesteps=space_timesteps(100, "ddim10"), loss_weighting="min_snr")
    assert diffusion.num_timesteps == reference.num_timesteps == 10
    assert torch.equal(diffusion.alphas_cumprod, reference.alphas_cumprod)
    assert diffusion.training_levers == reference.training_levers
    assert create_diffusion().use_timesteps is None


@pytest.mark.parametrize(("key", "allowed"), [
    ("schedule", "linear, cosine"), ("mean_type", "eps, x0, v"),
    ("var_type", "fixed_small, fixed_large, learned, learned_range"), ("loss_type", "simple, hybrid, vlb"),
    ("loss_weighting", "none, min_snr, p2"),
])
def test_an_unknown_option_names_the_allowed_values(key, allowed):
    with pytest.raises(ValueError, match=f"unknown .*{key.split('_')[-1]}.* 'bad'; allowed: {allowed}$"):
        create_diffusion(**{key: "bad"})
