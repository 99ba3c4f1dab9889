"""One set of defaults: the typed schema (``config/schema.py``) and the default composition (``conf/train.yaml``)
agree key by key, and the sampler settings have one owner (``SampleConfig``)."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
from omegaconf import OmegaConf
from run_config import compose_run

from ddpm_lightning.cli.validate import TYPED_GROUPS
from ddpm_lightning.config.schema import SampleConfig
from ddpm_lightning.sampling import sample_images, sampling_overrides


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


def test_sample_images_takes_its_defaults_from_sample_config():
    parameters = inspect.signature(sample_images).parameters
    for field in dataclasses.fields(SampleConfig):
        assert parameters[field.name].default == field.default, field.name


def test_sampling_overrides_keep_the_runs_own_settings_unless_given():
    assert sampling_overrides() == {}
    assert sampling_overrides("ddpm", "all", 0.5, "karras") == {"method": "ddpm", "steps": None, "eta": 0.5,
                                                              "schedule": "karras"}
    assert sampling_overrides(steps=10) == {"steps": 10}
    assert dataclasses.replace(SampleConfig(), **sampling_overrides(steps="all")).steps is None


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"method": "dpm"}, r"unknown sampling method 'dpm'; allowed: ddpm, ddim"),
    ({"schedule": "cos"}, r"unknown sampling schedule 'cos'; allowed: adm"),
])
def test_sampling_overrides_refuse_unknown_options_naming_the_allowed(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sampling_overrides(**kwargs)
