"""One set of defaults: the typed schema (``config/schema.py``) and the default composition (``conf/train.yaml``)
agree key by key, and the sampler settings and the guidance settings each have one owner (``SampleConfig``,
``GuidanceConfig``)."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch
from omegaconf import OmegaConf
from run_config import compose_run

from ddpm_lightning.cli.validate import TYPED_GROUPS
from ddpm_lightning.config.schema import GuidanceConfig, SampleConfig
from ddpm_lightning.diffusion import GaussianDiffusion, make_beta_schedule
from ddpm_lightning.sampling import resolve_sampler, sample_images


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    return compose_run([], tmp_path_factory.mktemp("run"))


@pytest.mark.parametrize("group", sorted(TYPED_GROUPS))
def test_the_default_composition_equals_the_schema_defaults(default_run, group):
    """A yaml default that differs from its schema field's default is a second, contradicting source."""
    schema_defaults = OmegaConf.to_container(OmegaConf.structured(TYPED_GROUPS[group]))
    assert OmegaConf.to_container(default_run[group], resolve=True) == schema_defaults


def test_the_sample_group_keys_are_the_sample_config_fields(default_run):
    assert list(default_run.sample) == [field.name for field in dataclasses.fields(SampleConfig)]


def test_sample_images_takes_the_settings_whole_with_sample_config_defaults():
    """One object, no second spelling: no SampleConfig field is also a keyword of sample_images, and no settings
    sample with SampleConfig's defaults."""
    parameters = inspect.signature(sample_images).parameters
    assert parameters["settings"].default is None
    assert not {field.name for field in dataclasses.fields(SampleConfig)} & set(parameters)
    diffusion = GaussianDiffusion(make_beta_schedule("linear", 100))
    net = lambda x, t: 0.5 * x  # noqa: E731
    default, _ = sample_images(net, diffusion, 3, (1, 2, 2), seed=4)
    explicit, _ = sample_images(net, diffusion, 3, (1, 2, 2), SampleConfig(), seed=4)
    other, _ = sample_images(net, diffusion, 3, (1, 2, 2), SampleConfig(method="ddpm"), seed=4)
    assert torch.equal(default, explicit) and not torch.equal(default, other)


def test_resolve_sampler_keeps_the_runs_own_settings_unless_given():
    own = SampleConfig(method="dpm++2m", steps=10, schedule="karras", batch_size=8)
    assert resolve_sampler(own) == own
    assert resolve_sampler(own, {"method": None, "steps": None, "eta": None, "schedule": None}) == own
    assert resolve_sampler(own, {"method": "ddim", "steps": "all", "eta": 0.5, "schedule": "adm"}) == \
        dataclasses.replace(own, method="ddim", steps=None, eta=0.5, schedule="adm")
    assert resolve_sampler(own, {"steps": 12, "batch_size": 3}) == dataclasses.replace(own, steps=12, batch_size=3)
    # a checkpoint's stored dict: keys that are no field are dropped, the missing ones keep the defaults
    assert resolve_sampler({"method": "ddpm", "num_samples": 9}) == SampleConfig(method="ddpm")
    assert resolve_sampler(None) == SampleConfig()


@pytest.mark.parametrize(("base", "overrides", "match"), [
    (None, {"method": "dpm"}, r"unknown sampling method 'dpm'; allowed: ddpm, ddim, dpm\+\+2m"),
    (None, {"schedule": "cos"}, r"unknown sampling schedule 'cos'; allowed: adm, uniform, logsnr"),
    (None, {"schedule": "karras", "steps": "ddim25"}, r"schedule=karras needs an integer number of steps"),
    (None, {"eta": -1}, r"eta must be a number >= 0"),
    (None, {"batch_size": 0}, r"batch_size must be an integer >= 1, got 0"),
    (None, {"sampler": "ddpm"}, r"unknown sampler setting 'sampler'; allowed: method, steps, eta, schedule"),
    (SampleConfig(method="ddpm"), {"eta": 0.5},
     r"^eta=0\.5 is DDIM's; the sampler ddpm \(the run's own sample\.method\) does not use it: drop eta, or give "
     r"method=ddim$"),
    (None, {"method": "unipc", "eta": 0.5}, r"^eta=0\.5 is DDIM's; method=unipc does not use it"),
])
def test_resolve_sampler_refuses_bad_settings_naming_the_allowed(base, overrides, match):
    with pytest.raises(ValueError, match=match):
        resolve_sampler(base, overrides)


@pytest.mark.parametrize("config_name,node", [("eval", "guidance"), ("sample", "guidance"),
                                              ("train", "callbacks.generative_metrics.guidance")])
def test_every_guidance_group_is_the_guidance_config(tmp_path, config_name, node):
    """One spelling: ddpm-eval's, ddpm-sample's and the metric callback's guidance keys and defaults are the
    GuidanceConfig's."""
    overrides = ["callbacks=metrics"] if config_name == "train" else []
    cfg = compose_run(overrides, tmp_path, config_name=config_name)
    schema = OmegaConf.to_container(OmegaConf.structured(GuidanceConfig))
    assert OmegaConf.to_container(OmegaConf.select(cfg, node), resolve=True) == schema


@pytest.mark.parametrize("key", ["scale", "cfg_scale"])
def test_guidance_config_refuses_a_negative_scale(key):
    with pytest.raises(ValueError, match=rf"guidance\.{key} must be a number >= 0, got -1"):
        GuidanceConfig(**{key: -1})
