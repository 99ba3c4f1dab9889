"""The experiment framework end to end on tiny configs: every experiment composes and trains, checkpoints
hold EMA + config and load with weights_only, resume continues exactly, wrong overrides fail in one line."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError, ValidationError
from run_config import TINY, compose_run

from ddpm_lightning.cli.train import train
from ddpm_lightning.config import CONFIG_DIR
from ddpm_lightning.modules.checkpoint import load_diffusion_module
from ddpm_lightning.sampling import Guidance, resolve_sampler

EXPERIMENTS = sorted(p.stem for p in (Path(CONFIG_DIR) / "experiment").glob("*.yaml"))
DIFFUSION_EXPERIMENTS = [e for e in EXPERIMENTS if not e.startswith(("classifier", "guidance"))]


@pytest.mark.parametrize("experiment", DIFFUSION_EXPERIMENTS)
def test_every_experiment_trains_a_few_steps(experiment, tmp_path):
    cfg = compose_run([f"experiment={experiment}", *TINY], tmp_path)
    metrics = train(cfg)
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
    assert "val/vlb_bpd" in metrics
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    assert (tmp_path / "summary.json").is_file()


def test_main_job_composes_with_its_real_settings(composed):
    cfg = composed(["experiment=default"])
    assert cfg.data._target_.endswith("AnimalMNISTDataModule")
    assert cfg.model.class_cond is True
    assert cfg.trainer.max_time is not None  # bounded wall time on 2 cores
    # the time-to-quality winners (benchmarks/README.md) and the in-loop FID the dashboard shows
    assert (cfg.diffusion.mean_type, cfg.sample.method, cfg.model.num_res_blocks) == ("v", "ddpm", 1)
    metrics_cb = cfg.callbacks.generative_metrics
    assert metrics_cb.every_n_val_epochs >= 1 and metrics_cb.in_loop_num_samples < metrics_cb.num_samples
    assert (metrics_cb.method, metrics_cb.steps, metrics_cb.eta) == (None, None, None)  # the run's own sample:


def test_checkpoint_holds_ema_config_and_samples_alone(tmp_path):
    cfg = compose_run([*TINY, "model.class_cond=true", "train.p_uncond=0.2"], tmp_path)
    train(cfg)
    path = tmp_path / "checkpoints" / "last.ckpt"
    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert any(k.startswith("ema.module.") for k in raw["state_dict"])
    assert raw["run_config"]["data"]["_target_"].endswith("DigitsDataModule")
    module = load_diffusion_module(path)
    two_steps = resolve_sampler(module.sample_settings, {"steps": 2})
    images, labels = module.sample(3, two_steps, guidance=Guidance(cfg_scale=1.5), y="balanced")
    assert images.shape == (3, 1, 16, 16) and labels.tolist() == [0, 1, 2]
    # EMA differs from the raw weights after training (warm-up EMA, 4 steps); the checkpoint holds both
    net, ema = dict(module.net.named_parameters()), dict(module.ema.module.named_parameters())
    assert net.keys() == ema.keys()
    differing = [name for name in net if not torch.equal(net[name], ema[name])]
    assert differing, "the EMA weights equal the trained weights"
    name = differing[0]
    assert torch.equal(raw["state_dict"][f"ema.module.{name}"], ema[name])
    assert torch.equal(raw["state_dict"][f"net.{name}"], net[name])


def _loss_curve(run_dir: Path) -> list[float]:
    import csv

    rows = []
    for path in sorted((run_dir / "csv").glob("version_*/metrics.csv")):
        with open(path) as handle:
            rows += list(csv.DictReader(handle))
    return [float(r["train/loss"]) for r in rows if r.get("train/loss")]


def test_resume_continues_exactly(tmp_path):
    common = [*TINY, "trainer.deterministic=true", "callbacks.model_checkpoint.every_n_train_steps=2",
              "callbacks.model_checkpoint.save_top_k=-1", "callbacks.model_checkpoint.monitor=null",
              "trainer.val_check_interval=2", "data.random_flip=false"]
    full = compose_run([*common, "trainer.max_steps=4"], tmp_path / "full")
    train(full)
    first = compose_run([*common, "trainer.max_steps=2"], tmp_path / "part")
    train(first)
    resumed = compose_run([*common, "trainer.max_steps=4", "resume=auto"], tmp_path / "part")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(resumed)
    # mid-epoch resume is exact here, so Lightning's "dataloader is not resumable" alarm must not reach users
    assert not [w for w in caught if "ended before the epoch ended" in str(w.message)]
    ckpt_full = torch.load(tmp_path / "full" / "checkpoints" / "last.ckpt", weights_only=True)
    ckpt_resumed = torch.load(tmp_path / "part" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt_resumed["global_step"] == ckpt_full["global_step"] == 4
    full_curve, part_curve = _loss_curve(tmp_path / "full"), _loss_curve(tmp_path / "part")
    assert len(full_curve) == len(part_curve) == 4
    torch.testing.assert_close(torch.tensor(part_curve), torch.tensor(full_curve), rtol=1e-5, atol=1e-6)
    for key, value in ckpt_full["state_dict"].items():
        torch.testing.assert_close(ckpt_resumed["state_dict"][key], value, rtol=1e-5, atol=1e-6, msg=key)


def test_wandb_offline_run_writes_its_folder(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = compose_run([*TINY, "logger=many"], tmp_path)
    train(cfg)
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert runs, f"no offline W&B run under {tmp_path / 'wandb'}"


def test_wrong_key_and_type_fail_before_any_work(tmp_path):
    with pytest.raises(ConfigCompositionException, match="model.no_such_flag"):
        compose_run(["model.no_such_flag=1"], tmp_path)
    with pytest.raises((ValidationError, ConfigCompositionException), match="optim.lr"):
        compose_run(["optim.lr=fast"], tmp_path)
    with pytest.raises((ConfigKeyError, ConfigCompositionException)):
        compose_run(["model=no_such_model"], tmp_path)


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ddpm_lightning.train", *args, f"hydra.run.dir={cwd}/run"],
                          capture_output=True, text=True, cwd=cwd, timeout=300,
                          env={**__import__("os").environ, "WANDB_MODE": "offline"})


@pytest.mark.slow  # two CLI subprocesses (~25 s); test_bad_inputs covers both errors in process and the CLI's exit 2
def test_cli_errors_are_one_line(tmp_path):
    unknown_group = _cli("model=no_such_model", cwd=tmp_path)
    assert unknown_group.returncode != 0
    assert "no_such_model" in unknown_group.stderr and "adm_adagn" in unknown_group.stderr  # lists options
    assert "Traceback" not in unknown_group.stderr
    bad_value = _cli(*TINY, "diffusion.schedule=quadratic", cwd=tmp_path)
    assert bad_value.returncode == 2
    assert "Traceback" not in bad_value.stderr
    last = bad_value.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and "allowed: linear, cosine" in last


def test_ddp_two_cpu_processes(tmp_path):
    cfg = compose_run([*TINY, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
                       "trainer.strategy=ddp_spawn", "trainer.max_steps=2", "train.timestep_sampler=loss-second-moment",
                       "callbacks.sample_grid=null"], tmp_path)
    train(cfg)
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 2
    # the loss-aware sampler saw both ranks' losses: 2 steps x 2 ranks x batch 8
    assert int(ckpt["timestep_sampler"]["loss_counts"].sum()) == 2 * 2 * 8


def test_generative_metrics_in_loop_and_at_the_end(tmp_path):
    import json

    cfg = compose_run([*TINY, "callbacks=metrics", "model.class_cond=true",
                       "callbacks.generative_metrics.every_n_val_epochs=1",
                       "callbacks.generative_metrics.in_loop_num_samples=4",
                       "callbacks.generative_metrics.metrics=[fid,kid,pr,is_clf]",
                       "callbacks.generative_metrics.classifier_epochs=1",
                       "callbacks.model_checkpoint.monitor=val/fid@4"], tmp_path)
    metrics = train(cfg)
    for key in ("val/fid@6", "val/kid_mean@6", "val/precision@6", "val/recall@6", "val/is_clf_mean@6"):
        assert key in metrics and metrics[key] == metrics[key], key  # present and not NaN
    assert metrics["val/fid@6"] > 0
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["val/fid@6"] == metrics["val/fid@6"] and saved["num_samples"] == 6  # the final, larger score
    header = next((tmp_path / "csv").glob("version_*/metrics.csv")).read_text().splitlines()[0]
    assert "val/fid@4" in header  # the cheaper in-loop score, logged so ModelCheckpoint can monitor it
    states = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["callbacks"]
    best = next(state for name, state in states.items() if name.startswith("ModelCheckpoint"))
    assert best["monitor"] == "val/fid@4" and float(best["best_model_score"]) > 0
    assert list((tmp_path / "cache" / "fid_stats").glob("*.npz")), "reference statistics were not cached"


@pytest.mark.parametrize(("precision", "autocast"), [("bf16-mixed", True), ("32-true", False)])
def test_callbacks_sample_at_the_training_precision(tmp_path, monkeypatch, precision, autocast):
    """The metric and grid callbacks sample under the trainer's precision (bf16 autocast: 1.8x faster, same FID)."""
    from ddpm_lightning.modules import DiffusionModule

    seen: list[bool] = []  # autocast on, per sampling call
    original = DiffusionModule.sample

    def recording_sample(self, num_samples, settings=None, **kwargs):
        seen.append(torch.is_autocast_enabled("cpu"))
        return original(self, num_samples, settings, **kwargs)

    monkeypatch.setattr(DiffusionModule, "sample", recording_sample)
    train(compose_run([*TINY, "callbacks=metrics", f"trainer.precision={precision}",
                       "callbacks.generative_metrics.metrics=[fid]"], tmp_path))
    # the metric callback's timing probe at fit start (a warm-up and a timed batch), one grid and one metric run at
    # the end of training
    assert len(seen) == 4, seen
    assert all(enabled is autocast for enabled in seen), seen


def test_precision_auto_picks_bf16_only_where_it_is_fast(monkeypatch):
    from ddpm_lightning import precision

    assert precision.resolve_precision("16-mixed", "cpu") == "16-mixed"  # explicit choices are kept
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda: True)
    assert precision.resolve_precision("auto", "cpu") == "bf16-mixed"
    monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda: False)
    assert precision.resolve_precision("auto", "auto") == "32-true"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert precision.resolve_precision("auto", "gpu") == "bf16-mixed"
    assert precision.resolve_precision("auto", "cpu") == "32-true"  # the CPU asked for, without bf16 units
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert precision.resolve_precision("auto", "cuda") == "32-true"


@pytest.mark.parametrize(
    ("amx", "avx512_bf16", "expected"),
    [(True, False, True), (False, True, True), (True, True, True), (False, False, False)],
)
def test_fast_bf16_means_amx_or_avx512_bf16(monkeypatch, amx, avx512_bf16, expected):
    from ddpm_lightning import precision

    for key in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY"):  # no cap on the kernels
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    assert precision.cpu_has_fast_bf16() is expected
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported", raising=False)
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported", raising=False)
    assert precision.cpu_has_fast_bf16() is False  # a torch without the probes: fp32, the safe choice


@pytest.mark.parametrize(("env", "fast"), [
    ({}, True),
    ({"ONEDNN_MAX_CPU_ISA": "AVX2"}, False),  # the AVX2 emulation of issue #38
    ({"ONEDNN_MAX_CPU_ISA": "avx512_core"}, False),  # AVX-512 without BF16
    ({"DNNL_MAX_CPU_ISA": "AVX2"}, False),
    ({"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"}, True),
    ({"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_AMX"}, True),
    ({"ONEDNN_MAX_CPU_ISA": "ALL"}, True),
    ({"ATEN_CPU_CAPABILITY": "avx2"}, False),
    ({"ATEN_CPU_CAPABILITY": "default"}, False),
    ({"ATEN_CPU_CAPABILITY": "avx512"}, True),
])
def test_an_isa_cap_below_bf16_means_fp32(monkeypatch, env, fast):
    """A bf16 CPU held below its bf16 instructions by the environment runs bf16 emulated: auto picks fp32."""
    from ddpm_lightning import precision

    for key in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    assert precision.cpu_has_fast_bf16() is fast
    assert precision.resolve_precision("auto", "cpu") == ("bf16-mixed" if fast else "32-true")


def test_precision_auto_trains(tmp_path):
    metrics = train(compose_run([*TINY, "trainer.precision=auto", "trainer.max_steps=2"], tmp_path))
    assert metrics["train/loss"] == metrics["train/loss"]  # a finite loss under whichever precision was chosen


def test_channels_last_trains_the_same_model(tmp_path):
    from ddpm_lightning.modules.checkpoint import load_diffusion_module

    runs = {}
    for flag in (False, True):
        runs[flag] = train(compose_run([*TINY, f"model.channels_last={str(flag).lower()}", "trainer.max_steps=2"],
                                       tmp_path / str(flag)))
    assert runs[True]["train/loss"] == pytest.approx(runs[False]["train/loss"], rel=1e-4)
    module = load_diffusion_module(tmp_path / "True" / "checkpoints" / "last.ckpt")
    weights = [p for p in module.net.parameters() if p.dim() == 4]
    assert weights and all(p.is_contiguous(memory_format=torch.channels_last) for p in weights)
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in module.ema_net.parameters() if p.dim() == 4)
    images, _ = module.sample(2, resolve_sampler(module.sample_settings, {"steps": 2}), seed=0)
    assert images.shape == (2, 1, 16, 16) and torch.isfinite(images).all()


def test_compile_switch_covers_training_and_sampling(monkeypatch):
    """model.compile=true routes the train step and sampling through torch.compile'd networks (the compiler is
    replaced by a counting wrapper here: inductor needs minutes on 2 cores)."""
    from ddpm_lightning.modules import DiffusionModule

    class Counting(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner, self.calls = inner, 0

        def forward(self, *args, **kwargs):
            self.calls += 1
            return self.inner(*args, **kwargs)

    wrappers = []
    monkeypatch.setattr(torch, "compile", lambda module, **_: wrappers.append(Counting(module)) or wrappers[-1])
    model = {"model_channels": 32, "channel_mult": [1], "num_res_blocks": 1, "attention_resolutions": [],
             "class_cond": True, "compile": True}
    module = DiffusionModule(model, {"num_timesteps": 50}, {"lr": 1e-3}, {"decay": 0.9}, image_size=8, channels=1,
                             num_classes=3)
    assert [w.inner for w in wrappers] == [module.net]
    loss = module.diffusion.training_losses(module._train_step_fn, torch.randn(2, 1, 8, 8), torch.tensor([1, 5]),
                                            model_kwargs={"y": torch.tensor([0, 2])})["loss"]
    assert loss.shape == (2,) and wrappers[0].calls == 1
    ddim = resolve_sampler(module.sample_settings, {"method": "ddim", "steps": 3})
    module.sample(2, ddim, y="random")
    module.sample(2, ddim, y="random")
    assert [w.inner for w in wrappers] == [module.net, module.ema_net]  # the EMA net compiled once, reused
    assert wrappers[1].calls == 6
    assert "_compiled_for_sampling" not in str(module.state_dict().keys())
