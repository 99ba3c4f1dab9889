"""The one module of choices (``config/choices.py``): torch-free, every key it checks exists in the configs, every
shipped config option is one of its values, and a wrong value is refused before torch is imported."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from ddpm_lightning.cli.validate import check_choices, check_run
from ddpm_lightning.config import CONFIG_DIR, choices

# compositions that together hold every key the checks name (the metric callback is an opt-in group)
TRAIN_COMPOSITIONS = ([], ["experiment=default"], ["callbacks=metrics"], ["experiment=classifier_default"],
                      ["data=image_folder"])


def _compose(config_name: str, overrides: list[str]):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name, overrides=overrides)


@pytest.fixture(scope="module")
def train_configs():
    from ddpm_lightning.config import register_configs

    register_configs()
    return [_compose("train", overrides) for overrides in TRAIN_COMPOSITIONS]


def test_the_choices_module_imports_nothing_heavy():
    code = ("import sys, ddpm_lightning.config.choices; "
            "print(sorted(m for m in ('torch', 'lightning', 'hydra', 'omegaconf', 'numpy') if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            cwd=Path(__file__).parents[1]).stdout.strip()
    assert loaded == "[]"


def _has(cfg, key: str) -> bool:
    missing = object()
    return OmegaConf.select(cfg, key, default=missing, throw_on_resolution_failure=False) is not missing


@pytest.mark.parametrize("key", [*choices.INT_KEYS, *choices.COUNT_OR_FRACTION_KEYS, *choices.FLOAT_RANGES,
                                 *choices.CHOICE_KEYS])
def test_every_checked_training_key_exists_in_the_composed_config(train_configs, key):
    # a renamed key would otherwise silently lose its check (the checks skip absent keys); a trainer key that no
    # shipped config sets (+trainer.min_epochs=...) must be an argument of Lightning's Trainer
    if key.startswith("trainer.") and not any(_has(cfg, key) for cfg in train_configs):
        import inspect

        from lightning.pytorch import Trainer

        assert key.split(".", 1)[1] in inspect.signature(Trainer).parameters, f"{key} is no Trainer argument"
        return
    assert any(_has(cfg, key) for cfg in train_configs), f"{key} is checked but no composed ddpm-train config has it"


@pytest.mark.parametrize("config_name", ["eval", "sample"])
def test_every_checked_generation_key_exists_in_the_composed_config(config_name):
    cfg = _compose(config_name, ["ckpt=x.ckpt"] if config_name == "sample" else [])
    keys = [*choices.GENERATION_INTS, *choices.GENERATION_CHOICE_KEYS]
    eval_only = {"nll_images", "reference_n", "classifier_epochs", "pr_reference_n", "feature", "reference_split"}
    for key in keys:
        if config_name == "sample" and key in eval_only:
            continue
        assert _has(cfg, key), f"{key} is checked but conf/{config_name}.yaml has no such key"


# conf/experiment files for ddpm-eval (conf/eval.yaml says so)
EVAL_EXPERIMENTS = {"guidance_sweep", "guidance_sweep_cfg", "guidance_sweep_autoguidance"}


@pytest.mark.parametrize("group", ["diffusion", "experiment"])
def test_every_shipped_option_is_one_of_the_choices(group):
    options = sorted(p.stem for p in (Path(CONFIG_DIR) / group).glob("*.yaml"))
    assert options
    for option in options:
        if option in EVAL_EXPERIMENTS:
            cfg = _compose("eval", [f"{group}={option}"])
            check_choices(cfg, choices.GENERATION_CHOICE_KEYS)
        else:
            check_choices(_compose("train", [f"{group}={option}"]))  # raises on a value outside the lists


@pytest.mark.parametrize(("key", "value", "suggestion"), [
    ("diffusion.schedule", "cosin", "cosine"), ("diffusion.mean_type", "epsilon", "eps"),
    ("diffusion.var_type", "learned_rang", "learned_range"), ("diffusion.loss_type", "hybird", "hybrid"),
    ("diffusion.loss_weighting", "minsnr", "min_snr"), ("optim.lr_schedule", "cosin", "cosine"),
    ("train.timestep_sampler", "loss_second_moment", "loss-second-moment"), ("sample.method", "dpm++2", "dpm++2m"),
    ("sample.schedule", "karas", "karras"), ("objective", "classfier", "classifier"),
])
def test_a_wrong_choice_is_refused_before_torch_is_imported(key, value, suggestion):
    cfg = _compose("train", ["data=digits", f"{key}={value}"])
    with pytest.raises(ValueError) as error:
        check_run(cfg)
    assert str(error.value).startswith(f"{key}={value!r} is not an option; allowed: ")
    assert str(error.value).endswith(f"(did you mean {suggestion}?)")
    allowed = choices.CHOICE_KEYS[key]
    assert ", ".join(allowed) in str(error.value)


def test_the_training_check_runs_without_torch(tmp_path):
    """The whole pre-run check (keys, choices, numbers) of a bad choice answers with torch never imported."""
    code = ("import sys\n"
            "from hydra import compose, initialize_config_dir\n"
            "from ddpm_lightning.config import CONFIG_DIR, register_configs\n"
            "from ddpm_lightning.cli.validate import check_run\n"
            "register_configs()\n"
            "with initialize_config_dir(config_dir=CONFIG_DIR, version_base='1.3'):\n"
            "    cfg = compose('train', overrides=['optim.lr_schedule=cosin'])\n"
            "try:\n"
            "    check_run(cfg)\n"
            "except ValueError as error:\n"
            "    print(error)\n"
            "print('torch' in sys.modules, 'lightning' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).parents[1]).stdout.splitlines()
    assert out == ["optim.lr_schedule='cosin' is not an option; allowed: constant, cosine, linear (did you mean "
                   "cosine?)", "False False"]

