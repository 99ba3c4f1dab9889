"""Bad input gets one clear line and nothing is lost: a table of (case, expected message), run in-process
through the CLI wrapper (``run_cli``: exit code 2 and a single ``error:`` line on stderr), plus a few
through the real ``python -m ddpm_lightning.train`` and the library calls that have no CLI of their own."""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from faults import subprocess_env, train_command
from hydra import initialize_config_dir
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate
from PIL import Image
from run_config import TINY, compose_run

from ddpm_lightning.cli.errors import run_cli
from ddpm_lightning.cli.generation import load_model_and_guidance
from ddpm_lightning.cli.train import build_module, train
from ddpm_lightning.config import CONFIG_DIR
from ddpm_lightning.diffusion import GaussianDiffusion, build_guidance, make_beta_schedule

BASE = [o for o in TINY if not o.startswith(("data=", "data.image_size="))]  # cases pick their data set
DIGITS = ["data=digits", "data.image_size=16"]


# ------------------------------------------------------------------------------------------ fixtures on disk
def _image(path: Path, mode: str = "RGB", size: int = 20, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    bands = len(Image.new(mode, (1, 1)).getbands())
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, bands), dtype=np.uint8)
    Image.fromarray(pixels.squeeze(-1) if bands == 1 else pixels, mode=mode).save(path)


def _folder(root: Path, n: int = 12, extra: dict[str, str] | None = None) -> Path:
    for i in range(n):
        _image(root / f"img{i:02d}.png", seed=i)
    for name, mode in (extra or {}).items():
        _image(root / name, mode=mode, seed=99)
    return root


def _folder_data(path: Path, *more: str) -> list[str]:
    return ["data=image_folder", f"data.path={path}", "data.image_size=16", "data.num_workers=0", *more]


def _npz(path: Path, labels: list[int]) -> Path:
    images = np.random.default_rng(0).integers(0, 256, (len(labels), 8, 8, 1), dtype=np.uint8)
    np.savez(path, images, np.asarray(labels, dtype=np.int64))
    return path


def _module_checkpoint(tmp: Path, name: str, overrides: list[str]) -> Path:
    """A checkpoint (hyper_parameters + state_dict) of an untrained module built from ``TINY + overrides``."""
    cfg = compose_run([*TINY, *overrides], tmp / f"build-{name}")
    module = build_module(cfg, instantiate(cfg.data))
    path = tmp / f"{name}.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams), "global_step": 3,
                "pytorch-lightning_version": "2.6.6", "run_config": module.run_config}, path)
    return path


# ----------------------------------------------------------------------------------------------- the table
@dataclass
class Case:
    name: str
    expected: str  # regex searched in the one error line
    overrides: list[str] = field(default_factory=list)
    setup: Callable[[Path], list[str]] | None = None  # makes files under tmp_path, returns more overrides
    output_dir: Callable[[Path], Path] | None = None  # where the run goes (default: tmp_path / "run")
    env: dict[str, str] = field(default_factory=dict)  # environment of the run ("" unsets); HOME is tmp_path


CASES = [
    Case("unknown_group_option", r"Could not find 'model/no_such_model'(?s:.*)Available options(?s:.*)adm_adagn",
         ["model=no_such_model", *DIGITS]),
    Case("wrong_type", r"optim\.lr", ["optim.lr=fast", *DIGITS]),
    Case("image_size_not_divisible_by_downsampling",
         r"image_size=18 must be divisible by 2\*\*\(len\(channel_mult\)-1\)=4 for channel_mult=\(1, 2, 2\)",
         ["data=digits", "data.image_size=18", "model.channel_mult=[1,2,2]"]),
    Case("attention_resolution_never_reached",
         r"attention_resolutions \[4\] \(pixels\) are never reached; allowed: \[16, 8\]",
         [*DIGITS, "model.attention_resolutions=[4]"]),
    Case("channels_not_a_multiple_of_groupnorm", r"positive multiple of 32 .*model_channels=48",
         [*DIGITS, "model.model_channels=48"]),
    Case("negative_lr", r"optim\.lr must be > 0, got -0\.001", [*DIGITS, "optim.lr=-0.001"]),
    Case("linear_schedule_too_short", r"num_timesteps=20 gives beta_T = 1 >= 1; use num_timesteps >= 21, or "
         r"schedule=cosine$", [*DIGITS, "diffusion.schedule=linear", "diffusion.num_timesteps=20"]),
    Case("label_dropout_without_class_cond", r"train\.p_uncond > 0 .* needs model\.class_cond=true",
         [*DIGITS, "train.p_uncond=0.2"]),
    Case("batch_larger_than_the_data", r"training split has \d+ images, fewer than batch_size=64",
         [*DIGITS, "data.batch_size=64", "data.limit=40"]),
    Case("bad_resume_value", r"resume='sometimes'; allowed: auto, null", [*DIGITS, "resume=sometimes"]),
    Case("posthoc_ema_length_out_of_range", r"ema\.posthoc_sigma_rels must be a number in \(0, 0\.2887\] .*got 0\.5;",
         [*DIGITS, "ema.posthoc_sigma_rels=[0.05,0.5]"]),
    Case("max_nonfinite_steps_zero", r"max_nonfinite_steps must be an integer >= 1 or null, got 0",
         [*DIGITS, "train.max_nonfinite_steps=0"]),
    Case("data_folder_missing", r"data\.path='.*/missing' does not exist: create it",
         setup=lambda tmp: _folder_data(tmp / "missing")),
    Case("data_folder_empty", r"no images \(.*\) found in .*/empty",
         setup=lambda tmp: (tmp / "empty").mkdir() or _folder_data(tmp / "empty")),
    Case("data_folder_is_a_file", r"data\.path='.*/notes\.txt' is not a folder",
         setup=lambda tmp: (tmp / "notes.txt").write_text("x") and _folder_data(tmp / "notes.txt")),
    Case("corrupt_image", r"cannot read image .*/broken\.png .*data\.on_bad_image=skip",
         setup=lambda tmp: (_folder(tmp / "imgs") / "broken.png").write_bytes(b"\x89PNG not really")
         and _folder_data(tmp / "imgs")),
    Case("grayscale_image_in_rgb_folder", r"1 image\(s\) in .* are not RGB, e\.g\. .*/grey\.png \(mode 'L'\)",
         setup=lambda tmp: _folder_data(_folder(tmp / "imgs", extra={"grey.png": "L"}), "data.convert_mode=false")),
    Case("rgba_image_in_rgb_folder", r"are not RGB, e\.g\. .*/alpha\.png \(mode 'RGBA'\)",
         setup=lambda tmp: _folder_data(_folder(tmp / "imgs", extra={"alpha.png": "RGBA"}), "data.convert_mode=false")),
    Case("class_cond_on_unlabelled_folder", r"model\.class_cond=true but the data set has no labels",
         ["model.class_cond=true"], setup=lambda tmp: _folder_data(_folder(tmp / "imgs"))),
    Case("npz_labels_out_of_range", r"label 3 is out of range \[0, 3\) \(labels span 0\.\.5\)",
         setup=lambda tmp: ["data=npz", f"data.path={_npz(tmp / 'd.npz', list(range(6)) * 4)}",
                            "data.image_size=16", "data.num_classes=3"]),
    Case("npz_negative_labels", r"label -1 is out of range \[0, 2\)",
         setup=lambda tmp: ["data=npz", f"data.path={_npz(tmp / 'd.npz', [-1, 0, 1] * 8)}", "data.image_size=16"]),
    Case("checkpoint_missing", r"ckpt_path=.*/nope\.ckpt does not exist",
         setup=lambda tmp: [*DIGITS, f"ckpt_path={tmp / 'nope.ckpt'}"]),
    Case("checkpoint_truncated", r"checkpoint .*/half\.ckpt is corrupt or truncated",
         setup=lambda tmp: [*DIGITS, f"ckpt_path={_truncated(tmp)}"]),
    Case("checkpoint_of_a_different_architecture",
         r"checkpoint .*/wide\.ckpt was trained with a different architecture: model\.model_channels=64 in the "
         r"checkpoint, 32 in this run",
         setup=lambda tmp: [*DIGITS, f"ckpt_path={_module_checkpoint(tmp, 'wide', ['model.model_channels=64'])}"]),
    Case("classifier_checkpoint_for_a_diffusion_run",
         r"different architecture \(a classifier checkpoint for a diffusion run, or the reverse\)",
         setup=lambda tmp: [*DIGITS, f"ckpt_path={_module_checkpoint(tmp, 'clf', ['objective=classifier'])}"]),
    Case("output_folder_not_writable", r"cannot create the run folder .*/file\.txt/sub \(Not a directory\)",
         DIGITS, setup=lambda tmp: (tmp / "file.txt").write_text("x") and [],
         output_dir=lambda tmp: tmp / "file.txt" / "sub"),
    # issue #18: every key is used or refused, counts are integers in range named by key, never rounded/clamped
    Case("model_key_typo_with_plus", r"^error: model\.chanels is not a model setting \(did you mean model_channels\?\)",
         [*DIGITS, "+model.chanels=64"]),
    Case("ckpt_path_is_a_text_file", r"checkpoint .*/notes\.txt is a text file, not a torch checkpoint",
         setup=lambda tmp: (tmp / "notes.txt").write_text("not a checkpoint\n") and
         [*DIGITS, f"ckpt_path={tmp / 'notes.txt'}"]),
    Case("batch_size_zero", r"data\.batch_size must be an integer >= 1, got 0$", [*DIGITS, "data.batch_size=0"]),
    Case("batch_size_fractional", r"data\.batch_size must be an integer >= 1, got 2\.5$",
         [*DIGITS, "data.batch_size=2.5"]),
    Case("limit_negative", r"data\.limit must be an integer >= 1 or null, got -5$", [*DIGITS, "data.limit=-5"]),
    Case("max_steps_not_a_number", r"trainer\.max_steps must be an integer >= 1 or -1, got 'abc'$",
         [*DIGITS, "trainer.max_steps=abc"]),
    Case("max_steps_fractional", r"trainer\.max_steps must be an integer >= 1 or -1, got 2\.5$",
         [*DIGITS, "trainer.max_steps=2.5"]),
    Case("max_epochs_not_a_number", r"trainer\.max_epochs must be an integer >= 1 or -1 or null, got 'abc'$",
         [*DIGITS, "trainer.max_epochs=abc"]),
    Case("max_time_not_a_duration", r"trainer\.max_time='abc'; give DD:HH:MM:SS \(e\.g\. trainer\.max_time=00:01:30:00",
         [*DIGITS, "trainer.max_time=abc"]),
    Case("val_check_interval_zero", r"trainer\.val_check_interval must be an integer >= 1 \(batches\) or a fraction",
         [*DIGITS, "trainer.val_check_interval=0"]),
    Case("ema_decay_above_one", r"ema\.decay must be a number in \[0\.0, 1\.0\), got 1\.5$",
         [*DIGITS, "ema.decay=1.5"]),
    Case("sampling_steps_zero", r"sample\.steps=0: a sampler needs at least 1 step; give sample\.steps=N",
         [*DIGITS, "sample.steps=0"]),
    Case("grid_steps_negative", r"callbacks\.sample_grid\.steps=-2: a sampler needs at least 1 step",
         [*DIGITS, "callbacks.sample_grid.steps=-2"]),
    # issue #34: an input another one would make the run ignore, more processes than cores
    Case("resume_auto_and_ckpt_path_both_given",
         r"resume=auto and ckpt_path=.*/other\.ckpt both given: resume=auto continues this run folder's newest "
         r"checkpoint, ckpt_path= starts from the named file: give one$",
         setup=lambda tmp: [*DIGITS, "resume=auto", f"ckpt_path={tmp / 'other.ckpt'}"]),
    Case("more_training_processes_than_cores",
         r"trainer\.devices=100000 starts more processes than can work: this machine has \d+ CPU core\(s\); give "
         r"trainer\.devices=\d+$", [*DIGITS, "trainer.accelerator=cpu", "trainer.devices=100000"]),
    Case("wandb_online_without_a_key", r"logger\.wandb\.mode=online but no W&B API key is configured",
         [*DIGITS, "logger=wandb", "logger.wandb.mode=online"], env={"WANDB_API_KEY": "", "WANDB_MODE": ""}),
    Case("image_size_that_cannot_fit_in_memory",
         r"this run needs about [\d.]+ [GT]iB of memory for training activations \(data\.batch_size=8 x "
         r"data\.image_size=4096 x model\.model_channels=32\), [\d.]+ [MGT]iB is available: lower data\.batch_size",
         ["data=digits", "data.image_size=4096"]),
]


def _truncated(tmp: Path) -> Path:
    path = _module_checkpoint(tmp, "whole", [])
    data = path.read_bytes()
    (tmp / "half.ckpt").write_bytes(data[: len(data) // 2])
    return tmp / "half.ckpt"


def _tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _environment(monkeypatch, tmp_path: Path, env: dict[str, str]) -> None:
    """``env`` for an in-process run ("" unsets a variable); no W&B credentials or settings from this machine."""
    if not env:
        return
    (tmp_path / "netrc").write_text("")
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    monkeypatch.setenv("HOME", str(tmp_path))
    for key, value in env.items():
        if value:
            monkeypatch.setenv(key, value)
        else:
            monkeypatch.delenv(key, raising=False)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_fails_in_one_clear_line(case, tmp_path, capsys, monkeypatch):
    _environment(monkeypatch, tmp_path, case.env)
    overrides = [*BASE, *case.overrides, *(case.setup(tmp_path) if case.setup else [])]
    output_dir = case.output_dir(tmp_path) if case.output_dir else tmp_path / "run"
    before = _tree_digest(tmp_path)
    try:
        cfg = compose_run(overrides, output_dir)
    except ConfigCompositionException as error:  # Hydra's own errors: printed by Hydra without a traceback
        message = f"{error} {error.__cause__ or ''}"
        assert re.search(case.expected, message), message
        return
    with pytest.raises(SystemExit) as exit_info:
        run_cli(train, cfg)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert re.search(case.expected, err[0]), err[0]
    after = _tree_digest(tmp_path)  # nothing lost: every file that was there is unchanged
    assert {k: v for k, v in after.items() if k in before} == before


def test_cases_cover_the_issue_list():
    assert len(CASES) >= 39


def _closed_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# legitimate input the run handles: it completes, and says what it did in exactly one ``warning:`` line
WARNING_CASES = [
    Case("wandb_online_by_environment_without_reachability",
         r"^warning: W&B 127\.0\.0\.1:\d+ unreachable: .*; logging offline to .*/wandb \(upload later: wandb sync ",
         [*DIGITS, "logger=wandb", "trainer.max_steps=1"],
         env={"WANDB_MODE": "online", "WANDB_API_KEY": "k" * 40, "WANDB_BASE_URL": "http://127.0.0.1:{port}"}),
    Case("wandb_online_by_config_without_reachability",
         r"^warning: W&B 127\.0\.0\.1:\d+ unreachable: .*; logging offline to ",
         [*DIGITS, "logger=wandb", "logger.wandb.mode=online", "trainer.max_steps=1"],
         env={"WANDB_MODE": "", "WANDB_API_KEY": "k" * 40, "WANDB_BASE_URL": "http://127.0.0.1:{port}"}),
]


@pytest.mark.parametrize("case", WARNING_CASES, ids=[c.name for c in WARNING_CASES])
def test_legitimate_input_the_run_handles_is_said_in_one_warning_line(case, tmp_path, capsys, monkeypatch):
    port = _closed_port()
    _environment(monkeypatch, tmp_path, {k: v.format(port=port) for k, v in case.env.items()})
    train(compose_run([*BASE, *case.overrides], tmp_path / "run"))
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and re.search(case.expected, warnings[0]), err[-2000:]
    assert "Traceback" not in err and "CommError" not in err
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*"))


# ------------------------------------------------------------------------------------ converted, not fatal
def test_grayscale_and_rgba_images_are_converted_by_default(tmp_path):
    root = _folder(tmp_path / "imgs", extra={"grey.png": "L", "alpha.png": "RGBA"})
    cfg = compose_run([*BASE, *_folder_data(root)], tmp_path / "run")
    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    images = datamodule.reference_images("train")
    assert images.shape == (13, 3, 16, 16) and images.dtype == torch.uint8


# ---------------------------------------------------------------------------- library calls without a CLI
def test_learned_sigma_needs_twice_the_channels():
    diffusion = GaussianDiffusion(make_beta_schedule("linear", 100), var_type="learned")
    x, t = torch.zeros(2, 3, 8, 8), torch.tensor([1, 5])
    with pytest.raises(ValueError, match=r"var_type 'learned' needs a model with 2\*C = 6 output channels"):
        diffusion.training_losses(lambda x_t, t: torch.zeros(2, 3, 8, 8), x, t)


def test_guidance_scale_without_a_classifier():
    with pytest.raises(ValueError, match=r"guidance scale 2\.0 > 0 needs a noisy classifier checkpoint"):
        build_guidance(None, 2.0)


def test_classifier_trained_for_another_diffusion_process(tmp_path):
    diffusion = _module_checkpoint(tmp_path, "diffusion", [])
    classifier = _module_checkpoint(tmp_path, "classifier", ["objective=classifier", "diffusion.num_timesteps=100"])
    with pytest.raises(ValueError, match=r"classifier was trained for T=100 linear, the diffusion model uses T=50"):
        load_model_and_guidance(str(diffusion), {"classifier_ckpt": str(classifier), "scale": 1.0},
                                torch.device("cpu"))


# ------------------------------------------------------------------------------------------ the real CLI
def _cli(tmp_path: Path, *overrides: str, run_dir: Path | None = None, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(train_command([*BASE, *overrides], run_dir or tmp_path / "run"), capture_output=True,
                          text=True, cwd=tmp_path, timeout=300, env=subprocess_env(**env))


# data_folder_missing takes ~50 s on a loaded machine (in-process: the "data_folder_missing" case above)
@pytest.mark.parametrize("what", ["output_folder_not_writable",
                                  pytest.param("data_folder_missing", marks=pytest.mark.slow)])
def test_cli_bad_input_exits_2_with_one_error_line(what, tmp_path):
    if what == "output_folder_not_writable":  # root ignores chmod: a path below a regular file cannot exist
        (tmp_path / "file.txt").write_text("x")
        result = _cli(tmp_path, *DIGITS, run_dir=tmp_path / "file.txt" / "sub")
        expected = r"^error: cannot create the run folder .*/file\.txt/sub \(Not a directory\); set hydra\.run\.dir"
    else:
        result = _cli(tmp_path, *_folder_data(tmp_path / "missing"))
        expected = r"^error: data\.path='.*/missing' does not exist"
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and re.search(expected, errors[0]), result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1] == errors[0]


def test_wandb_without_network_or_key_falls_back_to_offline(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    (tmp_path / "netrc").write_text("")
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc, no ~/.config/wandb settings either
    cfg = compose_run([*BASE, *DIGITS, "logger=wandb", "trainer.max_steps=1"], tmp_path / "run")
    train(cfg)
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*"))


def test_gpu_trainer_without_a_gpu_fails_in_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    cfg = compose_run([*BASE, "trainer=gpu"], tmp_path / "run")
    with pytest.raises(SystemExit) as exit_info:
        run_cli(train, cfg)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.match(r"error: trainer\.accelerator=gpu but torch sees no GPU .*drop trainer=gpu",
                                      err[0]), err
    assert not (tmp_path / "run").exists()  # failed before any work


# ------------------------------------------------------------------ ddpm-sample / ddpm-eval: checked before work
GENERATION_CASES = [
    ("sample", ["steps=0"], r"steps=0: a sampler needs at least 1 step; give steps=N \(N >= 1\), steps=all"),
    ("eval", ["steps=-3"], r"steps=-3: a sampler needs at least 1 step"),
    ("sample", ["device=gpu"], r"device='gpu'; allowed: auto, cpu, cuda, cuda:N, mps$"),
    ("sample", ["y=-1"], r"y=-1; allowed: random, balanced, or a class index >= 0$"),
    ("eval", ["y=2.5"], r"y=2\.5; allowed: random, balanced"),
    ("sample", ["num_samples=0"], r"num_samples must be an integer >= 1, got 0$"),
    ("eval", ["batch_size=2.5"], r"batch_size must be an integer >= 1, got 2\.5$"),
    ("eval", ["nll_images=-1"], r"nll_images must be an integer >= 1, got -1$"),
    ("eval", ["guidance.scale=-1"], r"guidance\.scale must be a number >= 0, got -1"),
    ("sample", ["guidance.classifier_ckpt=clf.ckpt"],
     r"guidance\.classifier_ckpt is given but guidance\.scale=0: the classifier would guide nothing"),
    ("eval", ["samples={tmp}/s.npy"], r"samples=.*/s\.npy is a \.npy file; give an ADM-layout \.npz"),
    ("eval", ["samples={tmp}/half.npz"], r"samples=.*/half\.npz is not a readable \.npz \(truncated or not a zip"),
    ("eval", ["cache_dir={tmp}/file.txt/cache"], r"cannot write the cache_dir folder .*/file\.txt/cache: .*is a file"),
    ("sample", ["ckpt={tmp}/missing.ckpt"], r"checkpoint .*/missing\.ckpt does not exist$"),
    ("sample", ["method=ddpmm"],
     r"unknown sampling method 'ddpmm'; allowed: ddpm, ddim, dpm\+\+2m, .*unipc \(did you mean ddpm\?\)$"),
    ("sample", ["schedule=karas"],
     r"unknown sampling schedule 'karas'; allowed: adm, uniform, logsnr, karras, trailing \(did you mean"),
    ("sample", ["precision=16"], r"precision=16; allowed: 32, bf16"),
    ("sample", ["eta=-1"], r"eta must be a number >= 0 \(DDIM's stochasticity: 0 deterministic, 1 as DDPM\), got -1$"),
    ("eval", ["eta=0.5", "method=ddpm"],
     r"eta=0\.5 is DDIM's; method=ddpm does not use it: drop eta, or give method=ddim$"),
    ("sample", ["devices=0"], r"devices must be an integer >= 1, got 0$"),
    ("eval", ["samples={tmp}/empty", "data=digits"], r"samples folder .*/empty holds no images \(\.png, \.jpg"),
    ("eval", ["reference={tmp}/file.txt"], r"reference=.*/file\.txt is a \.txt file; give an ADM reference batch"),
    ("eval", ["reference={tmp}/missing.npz"], r"reference=.*/missing\.npz does not exist; give an ADM reference batch"),
    ("eval", ["reference={tmp}/whole.npz"],
     r"reference=.*/whole\.npz is not an ADM reference batch: it has \['arr_0'\], expected mu, sigma"),
    ("eval", ["reference_split=tset"], r"reference_split='tset'; allowed: train, val$"),
    ("eval", ["shard_size=0"], r"shard_size must be an integer >= 1, got 0$"),
    ("eval", ["metrics=[fid,fidd]"], r"metrics: unknown fidd \(did you mean fid\?\); allowed: fid, fid_inf, sfid, kid, "
                                     r"pr, is, is_clf, nll$"),
    ("eval", ["metrics=[fid,fid_inf]", "num_samples=5000"],
     r"metrics fid_inf needs num_samples >= 10240 \(subsets down to a fifth of the samples, each at least the 2048-d "
     r"feature size\), got 5000: raise num_samples or drop fid_inf$"),
    ("eval", ["feature=incepton"],
     r"unknown feature extractor 'incepton'; allowed: inception, tiny \(did you mean inception\?\)$"),
    ("eval", ["ckpt={tmp}/file.txt"], r"checkpoint .*/file\.txt is a text file, not a torch checkpoint"),
    ("eval", ["ema_sigma_rel=0.3"], r"ema_sigma_rel must be a number in \(0, 0\.2887\] \(the EMA length relative "
                                     r"to the run; 0\.2887 = the plain average of every step\), got 0\.3; "
                                     r"e\.g\. 0\.05-0\.2$"),
    ("eval", ["ema_sigma_rel=0"], r"ema_sigma_rel must be a number in \(0, 0\.2887\] .*got 0;"),
    ("eval", ["ema_sigma_rel=long"], r"ema_sigma_rel must be a number in \(0, 0\.2887\] .*got 'long';"),
    ("sample", ["ckpt={tmp}/fake.ckpt", "guidance.classifier_ckpt={tmp}", "guidance.scale=1"],
     r"checkpoint .* is a folder; give the \.ckpt file inside it$"),
    # issue #34: a missing ckpt, more processes than work or cores, an input another one would make ignored, a list
    # key given a bare value, every choice key (here reference_split, above method/schedule/feature/precision)
    ("sample", [], r"^error: ckpt is required: give ckpt=<a ddpm-train checkpoint, or ADM weights converted by "
                   r"ddpm-convert-adm>$"),
    ("eval", [], r"^error: give ckpt=<a ddpm-train checkpoint> or samples=<an \.npz or image folder> to evaluate"),
    ("sample", ["ckpt={tmp}/fake.ckpt", "devices=64", "num_samples=4"],
     r"^error: devices=64 starts more processes than can work: num_samples=4 makes 1 shard\(s\) of "
     r"shard_size=1000; give devices=1 \(or a smaller shard_size\)$"),
    ("eval", ["ckpt={tmp}/fake.ckpt", "devices=100000", "num_samples=100000", "shard_size=1", "device=cpu"],
     r"^error: devices=100000 starts more processes than can work: this machine has \d+ CPU core\(s\); give "
     r"devices=\d+$"),
    ("eval", ["ckpt={tmp}/fake.ckpt", "samples={tmp}/whole.npz"],
     r"^error: samples=.*/whole\.npz and ckpt=.*/fake\.ckpt both given: ckpt= scores new samples of the "
     r"checkpoint, samples= scores existing ones: give one$"),
    ("eval", ["samples={tmp}/whole.npz", "data=digits", "steps=10"],
     r"^error: steps=10 acts on sampling, but samples= scores existing samples \(nothing is sampled\): drop steps, "
     r"or give ckpt= instead of samples=$"),
    ("eval", ["samples={tmp}/whole.npz", "data=digits", "reference={tmp}/ref.npz", "write_reference={tmp}/out.npz"],
     r"^error: reference=.*/ref\.npz and write_reference=.*/out\.npz both given: write_reference= writes the "
     r"data set's own reference batch instead of scoring against reference=: give one$"),
    ("eval", ["ckpt={tmp}/fake.ckpt", "metrics=fid"], r"^error: metrics=fid: metrics is a list; give metrics=\[fid\]$"),
    ("eval", ["ckpt={tmp}/fake.ckpt", "reference_split=tran"],
     r"^error: reference_split='tran'; allowed: train, val \(did you mean train\?\)$"),
    # a reference batch whose statistics hold NaN (every FID against it: nan), an output named by its key
    ("eval", ["ckpt={tmp}/fake.ckpt", "reference={tmp}/nan.npz"],
     r"^error: reference=.*/nan\.npz: sigma holds 1 non-finite value\(s\) \(NaN or inf\), so every score against it "
     r"would be nan; use another reference batch, or write one from the data set \(ddpm-eval data=<name> "
     r"write_reference=<path\.npz>\)$"),
    ("eval", ["data=digits", "write_reference={tmp}/file.txt/ref.npz"],
     r"^error: cannot write the write_reference folder .*/file\.txt: .*/file\.txt is a file; set write_reference to "
     r"a writable folder$"),
]


@pytest.mark.parametrize("command,overrides,expected", GENERATION_CASES,
                         ids=[f"{c}-{(o or ['none'])[0].split('=')[0]}-{i}"
                              for i, (c, o, _) in enumerate(GENERATION_CASES)])
def test_sample_and_eval_inputs_fail_in_one_line_before_any_work(command, overrides, expected, tmp_path, capsys):
    from ddpm_lightning.cli.evaluate import CheckPlan
    from ddpm_lightning.cli.validate import CheckConfig

    np.save(tmp_path / "s.npy", np.zeros((2, 8, 8, 1), np.uint8))
    np.savez(tmp_path / "whole.npz", np.zeros((64, 8, 8, 1), np.uint8))
    data = (tmp_path / "whole.npz").read_bytes()
    (tmp_path / "half.npz").write_bytes(data[: len(data) // 2])
    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "fake.ckpt").write_bytes(b"PK\x03\x04")  # looks like torch's zip to the checks before torch
    (tmp_path / "empty" / "notes").mkdir(parents=True)
    np.savez(tmp_path / "ref.npz", mu=np.zeros(4), sigma=np.eye(4))
    np.savez(tmp_path / "nan.npz", mu=np.zeros(4), sigma=np.diag([1.0, np.nan, 1.0, 1.0]))
    cfg = compose_run([o.format(tmp=tmp_path) for o in overrides], tmp_path / "run", config_name=command)
    with pytest.raises(SystemExit) as exit_info:  # the Hydra callbacks of conf/<command>.yaml, in its order
        for callback in (CheckConfig(), *([CheckPlan()] if command == "eval" else [])):
            callback.on_run_start(cfg, config_name=command)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and re.search(expected, err[0]), err


# a classifier in a sweep: scale-0 rows are the unguided baseline, but some job must guide with it
GUIDED = ["ckpt={tmp}/fake.ckpt", "guidance.classifier_ckpt={tmp}/fake.ckpt"]
SWEEP_GUIDANCE_CASES = [
    ("sample", [*GUIDED, "seed=0,1"], "scales: 0"),
    ("sample", GUIDED, "scales: 0"),  # a one-job multirun
    ("eval", [*GUIDED, "guidance.scale=0,0.0"], "scales: 0"),
    ("eval", [*GUIDED, "experiment=guidance_sweep", "guidance.scale=0"], "scales: 0"),  # the command line wins
    ("eval", [*GUIDED, "experiment=guidance_sweep"], None),  # 0,0.5,...,8: the baseline row is allowed
    ("sample", [*GUIDED, "guidance.scale=0,1"], None),
]


@pytest.mark.parametrize("command,overrides,scales", SWEEP_GUIDANCE_CASES,
                         ids=[f"{c}-{i}" for i, (c, _, _) in enumerate(SWEEP_GUIDANCE_CASES)])
def test_a_classifier_no_sweep_job_guides_with_is_refused_before_any_job(command, overrides, scales, tmp_path,
                                                                         capsys):
    from hydra.core.global_hydra import GlobalHydra
    from hydra.types import RunMode

    from ddpm_lightning.cli.validate import CheckConfig

    (tmp_path / "fake.ckpt").write_bytes(b"PK\x03\x04")
    overrides = [o.format(tmp=tmp_path) for o in overrides]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):  # as `ddpm-<command> -m ...` composes
        config = GlobalHydra.instance().hydra.compose_config(command, overrides, run_mode=RunMode.MULTIRUN)
        if scales is None:
            CheckConfig().on_multirun_start(config, config_name=command)
            assert capsys.readouterr().err == ""
            return
        with pytest.raises(SystemExit) as exit_info:
            CheckConfig().on_multirun_start(config, config_name=command)
    GlobalHydra.instance().clear()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: guidance.classifier_ckpt is given but no job of the sweep has guidance.scale > 0 "
                   f"({scales}): the classifier would guide nothing; sweep guidance.scale over values > 0 (e.g. "
                   f"guidance.scale=0,1,2), or drop guidance.classifier_ckpt; no job was started"]


def _labelled_samples(tmp: Path) -> Path:
    images = np.random.default_rng(0).integers(0, 256, (6, 16, 16, 1), dtype=np.uint8)
    np.savez(tmp / "samples.npz", images, np.asarray([0, 1, 2, 3, 12, 5], dtype=np.int64))
    return tmp / "samples.npz"


# (command, overrides with {ckpt}/{tmp}, expected): checks that need the model or the data set, made after loading
# them and before any sampling or scoring
WORK_CASES = [
    ("sample", ["ckpt={ckpt}", "y=12", "num_samples=2"],
     r"^error: y=12 is out of range: the model knows classes 0\.\.9; give y=0\.\.9, random or balanced$"),
    ("eval", ["samples={samples}", *DIGITS, "metrics=[fid]", "feature=tiny", "reference_n=24"],
     r"^error: samples=.*/samples\.npz arr_1: label 12 is out of range \[0, 10\) \(labels span 0\.\.12\); they are not "
     r"labels of digits: score against the data set the samples were drawn for \(data=<name>\)$"),
]


@pytest.mark.parametrize("command,overrides,expected", WORK_CASES, ids=[f"{c}-{i}" for i, (c, _, _) in
                                                                           enumerate(WORK_CASES)])
def test_inputs_outside_the_models_or_data_sets_range_fail_in_one_line(command, overrides, expected, tmp_path,
                                                                       capsys):
    from ddpm_lightning.cli.evaluate import evaluate
    from ddpm_lightning.cli.sample import sample

    ckpt = _module_checkpoint(tmp_path, "cond", [*DIGITS, "model.class_cond=true"])
    values = {"ckpt": ckpt, "tmp": tmp_path, "samples": _labelled_samples(tmp_path)}
    cfg = compose_run([o.format(**values) for o in overrides], tmp_path / "run",
                      config_name="sample" if command == "sample" else "eval")
    with pytest.raises(SystemExit) as exit_info:
        run_cli(sample if command == "sample" else evaluate, cfg)
    assert exit_info.value.code == 2
    err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("[rank ")]
    assert len(err) == 1 and re.search(expected, err[0]), err
    assert not (tmp_path / "run" / "results.json").exists() and not (tmp_path / "run" / "samples.npz").exists()


def test_scoring_against_another_data_set_is_said_in_one_warning_line(tmp_path, capsys):
    """Legitimate (a cross-data-set FID), so it runs, but never without a word."""
    from ddpm_lightning.cli.evaluate import evaluate

    ckpt = _module_checkpoint(tmp_path, "digits", [*DIGITS, "model.class_cond=true"])
    cfg = compose_run([f"ckpt={ckpt}", "data=animal_mnist", "data.image_size=16", "data.fit=resize", "num_samples=2",
                       "steps=2", "metrics=[fid]", "feature=tiny", "reference_n=24", "device=cpu",
                       f"cache_dir={tmp_path / 'cache'}"], tmp_path / "run", config_name="eval")
    results = evaluate(cfg)
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert warnings == ["warning: scoring against another data set than the checkpoint was trained on "
                        "(data._target_='ddpm_lightning.data.AnimalMNISTDataModule' here, "
                        "'ddpm_lightning.data.DigitsDataModule' in the checkpoint); drop data= to score against its "
                        "own"]
    assert "fid@2" in results["metrics"]


def test_a_failed_write_names_the_file_asked_for_never_its_temporary(tmp_path, monkeypatch):
    from ddpm_lightning import artifacts

    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(NotADirectoryError) as error:  # a file where the output's folder should be
        artifacts.write_json(tmp_path / "file.txt" / "results.json", {})
    assert error.value.filename == str(tmp_path / "file.txt" / "results.json")

    def refused(path, mode="r", *args, **kwargs):  # a folder that refuses writes (root ignores chmod)
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(artifacts, "open", refused, raising=False)
    with pytest.raises(PermissionError) as error:
        artifacts.write_json(tmp_path / "results.json", {})
    assert error.value.filename == str(tmp_path / "results.json") and ".tmp" not in str(error.value)


def test_ctrl_c_while_waiting_for_the_wandb_host_is_one_line_and_exit_130(tmp_path, capsys, monkeypatch):
    """Ctrl-C during the W&B connection check (online asked for, the host silent): the run stops at once in one
    line, nothing of W&B started (the check is a daemon thread the interpreter does not wait for)."""
    from ddpm_lightning import loggers

    def pressed(*args, **kwargs):
        raise KeyboardInterrupt

    _environment(monkeypatch, tmp_path, {"WANDB_MODE": "online", "WANDB_API_KEY": "k" * 40})
    monkeypatch.setattr(loggers, "wandb_unreachable", pressed)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(train, compose_run([*BASE, *DIGITS, "logger=wandb"], tmp_path / "run"))
    assert exit_info.value.code == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: interrupted (Ctrl-C); resume=auto continues a training run from its last checkpoint"]
    assert not (tmp_path / "run" / "wandb").exists() or not list((tmp_path / "run" / "wandb").glob("*run-*"))


def test_ctrl_c_advice_names_only_options_of_the_command(tmp_path, capsys):
    """``resume=auto`` is a ddpm-train option: a ddpm-eval / ddpm-posthoc-ema Ctrl-C does not advise it."""
    def interrupted(cfg):
        raise KeyboardInterrupt

    for config, advice in (("eval", ""), ("train", "; resume=auto continues a training run from its last "
                                                    "checkpoint")):
        cfg = compose_run(["ckpt=x.ckpt"] if config == "eval" else TINY, tmp_path / config, config_name=config)
        with pytest.raises(SystemExit) as exit_info:
            run_cli(interrupted, cfg)
        assert exit_info.value.code == 130
        assert capsys.readouterr().err.strip().splitlines() == [f"error: interrupted (Ctrl-C){advice}"]


def test_eta_for_a_checkpoint_whose_own_sampler_is_not_ddim_is_refused_not_ignored(tmp_path):
    from ddpm_lightning.cli.generation import SAMPLER_OVERRIDES, command_sampler
    from ddpm_lightning.config.schema import SampleConfig

    own = SampleConfig(method="ddpm", steps=10, eta=0.0, schedule="adm")  # the checkpoint's sample settings
    for command in ("sample", "eval"):
        cfg = compose_run(["ckpt=x.ckpt", "eta=0.5"], tmp_path / command, config_name=command)
        assert set(SAMPLER_OVERRIDES) <= set(cfg)  # every override key is a ddpm-sample / ddpm-eval key
        expected = r"eta=0\.5 is DDIM's; the sampler ddpm \(the run's own sample\.method\) does not use it"
        with pytest.raises(ValueError, match=expected + r": drop eta, or give method=ddim"):
            command_sampler(cfg, own)


def test_report_refuses_a_stale_time_that_is_not_positive(capsys):
    from ddpm_lightning.cli.report import parse_args

    with pytest.raises(SystemExit) as exit_info:
        parse_args(["sweep", "--stale-after", "-5"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == \
        "ddpm-report: error: --stale-after must be > 0 minutes, got -5"


def _report_job(folder: Path, overrides: list[str], command: str = "train", task: str = "ablate_arch") -> None:
    """A finished job folder as ddpm-train / ddpm-eval leave it (what ddpm-report reads)."""
    import json

    import yaml

    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (folder / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"task_name": task}))
    (folder / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump({"hydra": {"job": {"num": 0,
                                                                                     "config_name": command}}}))
    name = "results.json" if command == "eval" else "summary.json"
    (folder / name).write_text(json.dumps({"status": "completed", "metrics": {"val/fid@200": 30.0}}))


# folders that are not the jobs of one sweep: refused in one line, not averaged into one table
REPORT_CASES = [
    ("the_same_job_twice", lambda root: [_report_job(root / f"2026-12-0{d}" / "0", ["model=adm", "seed=0"])
                                         for d in (1, 2)],
     r"^error: .* holds the jobs of more than one sweep: .*2026-12-01/0 and .*2026-12-02/0 ran the same job "
     r"\(model=adm seed=0\), whose seeds would count twice; report each sweep folder on its own"),
    ("two_commands", lambda root: [_report_job(root / "a", ["seed=0"]), _report_job(root / "b", ["seed=1"], "eval")],
     r"^error: .* holds the jobs of more than one sweep: two commands, ddpm-train \(.*/a\) and ddpm-eval \(.*/b\)"),
    ("two_tasks", lambda root: [_report_job(root / "a", ["seed=0"]), _report_job(root / "b", ["seed=1"],
                                                                                 task="ablate_loss")],
     r"^error: .* holds the jobs of more than one sweep: two tasks, ablate_arch \(.*/a\) and ablate_loss "),
]


@pytest.mark.parametrize("name,make,expected", REPORT_CASES, ids=[c[0] for c in REPORT_CASES])
def test_a_report_over_folders_that_are_not_one_sweep_is_refused(name, make, expected, tmp_path, capsys):
    from ddpm_lightning.cli.report import main

    make(tmp_path / "multirun")
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "multirun"), "--no-plot"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.search(expected, err[0]), err
    assert not (tmp_path / "multirun" / "report.md").exists()


def test_a_class_index_for_an_unconditional_model_is_refused_not_ignored(tmp_path):
    from types import SimpleNamespace

    from ddpm_lightning.cli.generation import Generation, generate
    from ddpm_lightning.config.schema import SampleConfig

    unconditional = SimpleNamespace(device=torch.device("cpu"), num_classes=None)
    run = Generation(out_dir=tmp_path, num_samples=2, sampler=SampleConfig(batch_size=2), y=3)
    with pytest.raises(ValueError, match=r"y=3: the model is unconditional .*; drop y, or give guidance\.classifier"):
        generate(unconditional, run)


# --------------------------------------------------------------------- the real CLIs: one line, before Hydra
@pytest.mark.parametrize("module,args,expected", [
    ("train", ["model=adm_adgn"], r"^error: model=adm_adgn: no such option in model/; allowed: adm, adm_adagn, .*"
                                  r"\(did you mean adm_adagn\?\)$"),
    ("train", ["experiment=defualt"], r"^error: experiment=defualt: no such option in experiment/; allowed: .*"
                                      r"\(did you mean default\?\)$"),
    ("train", ["-m", "model=adm,adm_adgn"], r"^error: model=adm_adgn: no such option in model/"),
    ("train", ["+model.chanels=64"],
     r"^error: model\.chanels is not a model setting \(did you mean model_channels\?\)"),
    ("cli.evaluate", ["experiment=guidance_swep"], r"^error: experiment=guidance_swep: no such option in "
                                                   r"experiment/; .*\(did you mean guidance_sweep\?\)$"),
    ("cli.sample", ["ckpt=x.ckpt", "+foo=1"], r"^error: foo is not a ddpm-sample setting; allowed: batch_size, ckpt"),
    ("cli.sample", ["ckpt=x.ckpt", "num_sample=3"],
     r"^error: num_sample is not a ddpm-sample setting \(did you mean num_samples\?\); allowed: "),
    ("cli.sample", ["ckpt=x.ckpt", "data=digits"], r"^error: data is not a ddpm-sample setting; allowed: "),
    ("cli.evaluate", ["guidance.scal=2"],
     r"^error: guidance\.scal is not a guidance setting \(did you mean scale\?\); allowed: autoguidance_ckpt, "),
    ("train", ["lr=1e-4"], r"^error: lr is not a ddpm-train setting; allowed: allow_any_target, callbacks, "),
    ("train", ["optim.lr=fast"],
     r"^error: optim\.lr=fast: Value 'fast' of type 'str' could not be converted to Float \(full_key: optim\.lr\)$"),
    ("train", ["tags=abc"], r"^error: tags=abc: Invalid value assigned: str is not a ListConfig, list or tuple"),
    ("train", ["experiment=guidance_sweep"], r"^error: In 'experiment/guidance_sweep': ConfigKeyError raised while "
                                             r"composing config: Key 'required_keys' not in 'RunConfig' \(full_key"),
    ("cli.sample", ["ckpt=x.ckpt", "guidance=3"],
     r"^error: guidance=3: guidance is a group of keys; set guidance\.scale"),
    ("cli.posthoc_ema", ["ckpt=x.ckpt", "sigma_rel=0.1"],
     r"^error: sigma_rel is not a ddpm-posthoc-ema setting \(did you mean sigma_rels\?\)"),
    ("cli.posthoc_ema", ["ckpt=x.ckpt", "sigma_rels=[0.1,0.5]"],
     r"^error: sigma_rels must be a number in \(0, 0\.2887\] .*, got 0\.5; e\.g\. 0\.05-0\.2$"),
    # a sweep over EMA lengths is checked job by job before the first one runs (a bad length used to fail
    # after the good ones, in Hydra's words)
    ("cli.evaluate", ["-m", "ckpt={tmp}/fake.ckpt", "ema_sigma_rel=0.1,0.3"],
     r"^error: sweep job 1 \(ema_sigma_rel=0\.3\): ema_sigma_rel must be a number in \(0, 0\.2887\].*; no job "
     r"was started$"),
    # issue #34: a list key given a bare value, whatever the key (a string would be read letter by letter)
    ("train", ["callbacks=metrics", "callbacks.generative_metrics.metrics=fid"],
     r"^error: callbacks\.generative_metrics\.metrics=fid: callbacks\.generative_metrics\.metrics is a list; give "
     r"callbacks\.generative_metrics\.metrics=\[fid\]$"),
    ("cli.evaluate", ["ckpt=x.ckpt", "metrics=fid"], r"^error: metrics=fid: metrics is a list; give metrics=\[fid\]$"),
    ("cli.posthoc_ema", ["ckpt=x.ckpt", "sigma_rels=0.1"],
     r"^error: sigma_rels=0\.1: sigma_rels is a list; give sigma_rels=\[0\.1\]$"),
    ("cli.sample", [], r"^error: ckpt is required: give ckpt=<a ddpm-train checkpoint"),
    ("cli.sample", ["ckpt=x.ckpt", "hydra.run.dir={tmp}/file.txt/out"],
     r"^error: cannot create the run folder .*/file\.txt/out \(Not a directory\); set hydra\.run\.dir"),
])
def test_cli_config_errors_are_one_line_and_exit_2(module, args, expected, tmp_path):
    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "fake.ckpt").write_bytes(b"PK\x03\x04")  # looks like torch's zip to the checks before torch
    result = subprocess.run([sys.executable, "-m", f"ddpm_lightning.{module}", *[a.format(tmp=tmp_path) for a in args]],
                            capture_output=True, text=True, cwd=tmp_path, timeout=300, env=subprocess_env())
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and re.search(expected, lines[0]), result.stderr[-2000:]


# (console entry module, argv): --help, and a config error each command checks before any work
ENTRY_POINTS = [
    ("train", ["--help"]), ("train", ["data.batch_size=0"]), ("train", ["model=adm_adgn"]),
    ("sample", ["--help"]), ("sample", ["ckpt=x.ckpt", "num_samples=0"]),
    ("evaluate", ["--help"]), ("evaluate", ["ckpt=x.ckpt", "steps=0"]), ("evaluate", ["experiment=guidance_swep"]),
    ("report", ["--help"]), ("report", ["--stale-after", "abc", "x"]),
    ("convert_adm", ["--help"]), ("convert_adm", ["in.pt", "out.pt", "--kind", "classifier", "--num_channels", "3"]),
    ("posthoc_ema", ["--help"]), ("posthoc_ema", ["ckpt=x.ckpt", "sigma_rels=[abc]"]),
]


def test_every_console_script_is_a_cli_module():
    import tomllib

    scripts = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]["scripts"]
    modules = {target.split(":")[0].rsplit(".", 1)[-1] for target in scripts.values()}
    assert modules == {module for module, _ in ENTRY_POINTS}


def _entry_point_in_fresh_interpreter(module: str, argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """``ddpm_lightning.cli.<module>.main()`` with ``argv`` in a new interpreter; its last stdout line is
    ``exit=<code> heavy=<the heavy modules imported by then>``."""
    code = (f"import importlib, sys; sys.argv = ['ddpm', *{argv!r}]\n"
            f"try:\n    importlib.import_module('ddpm_lightning.cli.{module}').main()\n"
            "except SystemExit as exit:\n    code = exit.code\nelse:\n    code = 0\n"
            "heavy = sorted(m for m in ('torch', 'lightning', 'wandb') if m in sys.modules)\n"
            "print(f'\\nexit={code} heavy={heavy}')")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=cwd,
                          env=subprocess_env())


@pytest.mark.parametrize("module,argv", ENTRY_POINTS, ids=[f"{m}-{a[0]}" for m, a in ENTRY_POINTS])
def test_help_and_config_errors_import_neither_torch_nor_lightning(module, argv, tmp_path):
    """What keeps ``--help`` and config errors fast in every CLI: torch/Lightning are imported only once work
    starts (the argument parsing, Hydra composition and config checks run in a fresh interpreter here)."""
    result = _entry_point_in_fresh_interpreter(module, argv, tmp_path)
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    expected_code = 0 if argv == ["--help"] else 2
    assert result.stdout.strip().splitlines()[-1] == f"exit={expected_code} heavy=[]", \
        result.stdout[-1000:] + result.stderr[-2000:]
    if expected_code:
        assert "error:" in result.stderr.strip().splitlines()[-1]


def _choice_key_cases() -> list[tuple[str, list[str]]]:
    """Every choice-valued key of every command (``config/choices.py``) set to a value no list holds, and a
    missing ``ckpt``: (console module, argv)."""
    from omegaconf import OmegaConf

    from ddpm_lightning.config import choices

    sample_keys = set(OmegaConf.load(Path(CONFIG_DIR) / "sample.yaml"))
    # the config groups that hold a key the default composition lacks
    folder = ["data=image_folder", "data.path=x"]
    holders = {"callbacks.generative_metrics.": ["callbacks=metrics"], "data.mode": folder, "data.on_bad_image": folder}

    def holder(key: str) -> list[str]:
        return next((groups for prefix, groups in holders.items() if key.startswith(prefix)), [])

    return ([("train", [*holder(key), f"{key}=zzz"]) for key in choices.CHOICE_KEYS]
            + [("sample" if key in sample_keys else "evaluate", ["ckpt=x.ckpt", f"{key}=zzz"])
               for key in choices.GENERATION_CHOICE_KEYS]
            + [("sample", []), ("evaluate", [])])


@pytest.mark.parametrize("module,argv", _choice_key_cases(), ids=lambda v: v if isinstance(v, str) else "-".join(v))
def test_every_choice_key_and_a_missing_ckpt_fail_before_torch_is_imported(module, argv, tmp_path):
    """The console entry point, in a fresh interpreter: one ``error:`` line naming the key, exit 2, and neither
    torch nor Lightning in ``sys.modules`` afterwards (so no Lightning banner line either)."""
    result = _entry_point_in_fresh_interpreter(module, [*argv, f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    assert result.stdout.strip().splitlines()[-1] == "exit=2 heavy=[]", result.stdout[-1000:] + result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-2000:]
    key = argv[-1].split("=")[0] if argv else "ckpt"
    assert re.search(rf"\b{re.escape(key.split('.')[-1])}\b|zzz", lines[0]), lines[0]


def test_ctrl_c_during_training_is_one_line_and_exit_130(tmp_path, capsys):
    cfg = compose_run([*BASE, *DIGITS, "trainer.max_steps=4", "allow_any_target=true",
                       "+callbacks.interrupt._target_=faults.InterruptAt", "+callbacks.interrupt.step=2"],
                      tmp_path / "run")
    with pytest.raises(SystemExit) as exit_info:
        run_cli(train, cfg)
    assert exit_info.value.code == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: interrupted (Ctrl-C); resume=auto continues") and "Traceback" not in err
