"""Evaluation at paper scale on a tiny model: sharded generation (1 vs 2 processes), resume after Ctrl-C or a
full disk, the disk budget, ADM reference batches through the CLI, metrics on an image folder."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from run_config import TINY, compose_run

from ddpm_lightning.cli import shards as shards_module
from ddpm_lightning.cli.sample import sample
from ddpm_lightning.cli.train import train
from ddpm_lightning.data import ImageFolderDataModule
from ddpm_lightning.metrics import make_generative_metrics

EVAL = ["steps=2", "feature=tiny", "reference_n=40", "pr_reference_n=24", "shard_size=2", "batch_size=2",
        "metrics=[fid,sfid,kid,pr,is_clf]", "classifier_epochs=1"]


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("train")
    train(compose_run([*TINY, "model.class_cond=true"], out))
    return out / "checkpoints" / "last.ckpt"


def _run(tool: str, *args: str, out: Path, cache: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "DDPM_CACHE_DIR": str(cache)}
    # python -m: Lightning Fabric re-launches the same module for the other ranks
    return subprocess.run([sys.executable, "-m", f"ddpm_lightning.cli.{tool}", *args, f"hydra.run.dir={out}"],
                          capture_output=True, text=True, timeout=600, env=env, cwd=out.parent)


def _npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def test_one_and_two_processes_give_identical_samples_and_metrics(tiny_ckpt, tmp_path):
    cache = tmp_path / "cache"
    one = _run("evaluate", f"ckpt={tiny_ckpt}", "num_samples=7", *EVAL, "devices=1", out=tmp_path / "one",
               cache=cache)
    assert one.returncode == 0, one.stderr[-3000:]
    two = _run("evaluate", f"ckpt={tiny_ckpt}", "num_samples=7", *EVAL, "devices=2", out=tmp_path / "two",
               cache=cache)
    assert two.returncode == 0, two.stderr[-3000:]
    a = _npz(tmp_path / "one" / "samples.npz")
    assert a["arr_0"].shape == (7, 16, 16, 3) and a["arr_0"].dtype == np.uint8
    np.testing.assert_array_equal(a["arr_0"][..., 0], a["arr_0"][..., 2])  # 1-channel data repeated
    assert (tmp_path / "one" / "samples.npz").read_bytes() == (tmp_path / "two" / "samples.npz").read_bytes()
    ra = json.loads((tmp_path / "one" / "results.json").read_text())
    rb = json.loads((tmp_path / "two" / "results.json").read_text())
    assert ra["metrics"] == rb["metrics"]
    for key in ("fid@7", "sfid@7", "kid_mean@7", "precision@7", "recall@7", "is_clf_mean@7", "class_accuracy"):
        assert np.isfinite(ra["metrics"][key]), key
    assert rb["generation"]["world_size"] == 2 and ra["generation"]["world_size"] == 1
    assert "samples/s, ETA" in one.stderr and "[rank 1/2]" in two.stderr

    # the data set's reference batch in the ADM layout, then the same samples scored against it: same FID
    ref = tmp_path / "VIRTUAL_digits16.npz"
    written = _run("evaluate", "data=digits", "data.image_size=16", "data.limit=96", f"write_reference={ref}",
                   *EVAL, out=tmp_path / "ref", cache=cache)
    assert written.returncode == 0, written.stderr[-3000:]
    batch = _npz(ref)
    assert batch["arr_0"].shape == (24, 16, 16, 3) and {"mu", "sigma", "mu_s", "sigma_s"} <= set(batch)
    scored = _run("evaluate", f"samples={tmp_path / 'one' / 'samples.npz'}", f"reference={ref}", "data=digits",
                  "data.image_size=16", "data.limit=96", *[a for a in EVAL if not a.startswith("steps=")],
                  "metrics=[fid,sfid,kid,pr]", out=tmp_path / "adm",
                  cache=tmp_path / "other_cache")
    assert scored.returncode == 0, scored.stderr[-3000:]
    again = json.loads((tmp_path / "adm" / "results.json").read_text())["metrics"]
    for key in ("fid@7", "sfid@7", "precision@7", "recall@7"):
        assert again[key] == pytest.approx(ra["metrics"][key], rel=1e-5, abs=1e-9), key


def test_sigint_keeps_finished_shards_and_a_rerun_continues_byte_equal(tiny_ckpt, tmp_path):
    args = [f"ckpt={tiny_ckpt}", "num_samples=120", "shard_size=2", "batch_size=2", "steps=3", "method=ddpm"]
    cache = tmp_path / "cache"
    out = tmp_path / "cut"
    env = {**os.environ, "WANDB_MODE": "offline", "DDPM_CACHE_DIR": str(cache)}
    # SIGINT back to its default in the child: a shell's background job (CI started with `&`) inherits it ignored,
    # and Python then never raises KeyboardInterrupt
    proc = subprocess.Popen([sys.executable, "-m", "ddpm_lightning.cli.sample", *args, f"hydra.run.dir={out}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if (out / "shards").is_dir() and len(list((out / "shards").glob("*-*.npz"))) >= 2:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "sampling finished before the interrupt: make the test run longer"
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-2000:]
    last = [line for line in stderr.splitlines() if line.strip()][-1]
    assert last.startswith("interrupted: kept ") and "Traceback" not in stderr
    kept = sorted(p.name for p in (out / "shards").glob("*-*.npz"))
    assert 2 <= len(kept) < 60 and not (out / "samples.npz").exists()
    assert not list((out / "shards").glob(".*.tmp*"))

    resumed = _run("sample", *args, out=out, cache=cache)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert json.loads((out / "sample.json").read_text())["generation"]["skipped"] >= 2 * len(kept)
    whole = _run("sample", *args, out=tmp_path / "whole", cache=cache)
    assert whole.returncode == 0, whole.stderr[-2000:]
    assert (out / "samples.npz").read_bytes() == (tmp_path / "whole" / "samples.npz").read_bytes()


@pytest.mark.parametrize("command", ["sample", "evaluate"])
def test_ctrl_c_keeps_every_finished_image_whatever_the_shard_size(command, tiny_ckpt, tmp_path, monkeypatch,
                                                                   capsys):
    """Ctrl-C after 3 batches of 2 with the default shard_size (1000, so no shard was finished): the 6 images
    (and their features) stay as a partial shard, and the rerun continues from image 6 into outputs equal to an
    uninterrupted run's (samples.npz byte for byte, the same metrics)."""
    from ddpm_lightning.cli import generation
    from ddpm_lightning.cli.evaluate import evaluate

    run = sample if command == "sample" else evaluate
    config = "sample" if command == "sample" else "eval"
    overrides = [f"ckpt={tiny_ckpt}", "num_samples=10", "batch_size=2", "steps=2", "method=ddpm", "device=cpu",
                 *(["feature=tiny", "metrics=[fid,kid]", "reference_n=24", "pr_reference_n=24",
                    f"cache_dir={tmp_path / 'cache'}"] if command == "evaluate" else [])]
    real, firsts = generation._sample_fn, []

    def recorded(stop_after: int | None):
        def make(module, plan, labels):
            fn = real(module, plan, labels)

            def sample_fn(n: int, first: int):
                if stop_after is not None and len(firsts) == stop_after:
                    raise KeyboardInterrupt
                firsts.append(first)
                return fn(n, first)
            return sample_fn
        return make

    cut = tmp_path / "cut"
    monkeypatch.setattr(generation, "_sample_fn", recorded(stop_after=3))
    with pytest.raises(SystemExit) as stop:
        run(compose_run(overrides, cut, config_name=config))
    assert stop.value.code == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"interrupted: kept 6 finished samples in {cut / 'shards'}; rerun the same command with "
        f"hydra.run.dir={cut} to continue")
    assert sorted(p.name for p in (cut / "shards").glob("*.npz")) == ["000000000-000000006.partial.npz"]

    firsts.clear()
    monkeypatch.setattr(generation, "_sample_fn", recorded(stop_after=None))
    resumed = run(compose_run(overrides, cut, config_name=config))
    assert firsts == [6, 8]  # only the missing batches, the same ones as an uninterrupted run
    assert sorted(p.name for p in (cut / "shards").glob("*.npz")) == ["000000000-000000010.npz"]
    whole = run(compose_run(overrides, tmp_path / "whole", config_name=config))
    assert (cut / "samples.npz").read_bytes() == (tmp_path / "whole" / "samples.npz").read_bytes()
    assert resumed.get("metrics") == whole.get("metrics")
    assert resumed["generation"]["skipped"] == 6 and resumed["generation"]["generated"] == 4


def test_full_disk_is_one_line_and_keeps_the_finished_shards(tiny_ckpt, tmp_path, monkeypatch, capsys):
    overrides = [f"ckpt={tiny_ckpt}", "num_samples=6", "shard_size=2", "steps=2", "device=cpu"]
    real_savez, calls = np.savez, []

    def savez(file, **arrays):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_savez(file, **arrays)

    monkeypatch.setattr(shards_module.np, "savez", savez)
    with pytest.raises(SystemExit) as stop:
        sample(compose_run(overrides, tmp_path / "out", config_name="sample"))
    assert stop.value.code == 2
    err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("[rank ")]
    assert len(err) == 1 and err[0].startswith(f"error: no space left on {tmp_path / 'out' / 'shards'}: kept 2 ")
    assert [p.name for p in (tmp_path / "out" / "shards").glob("*.npz")] == ["000000000-000000002.npz"]
    assert not list((tmp_path / "out" / "shards").glob(".*.tmp*"))

    monkeypatch.setattr(shards_module.np, "savez", real_savez)  # space freed: the rerun continues
    result = sample(compose_run(overrides, tmp_path / "out", config_name="sample"))
    assert result["generation"]["skipped"] == 2 and result["generation"]["generated"] == 4


def test_disk_budget_and_settings_are_checked_up_front(tiny_ckpt, tmp_path):
    huge = compose_run([f"ckpt={tiny_ckpt}", "num_samples=1000000000", "device=cpu"], tmp_path / "huge",
                       config_name="sample")
    with pytest.raises(ValueError, match=r"num_samples=1000000000 needs ~.* of disk in .*only .* free"):
        sample(huge)
    assert not list((tmp_path / "huge" / "shards").glob("*-*.npz"))
    sample(compose_run([f"ckpt={tiny_ckpt}", "num_samples=2", "steps=2", "device=cpu"], tmp_path / "a",
                       config_name="sample"))
    with pytest.raises(ValueError, match="other settings \\(seed: 0 there, 1 now\\)"):
        sample(compose_run([f"ckpt={tiny_ckpt}", "num_samples=2", "steps=2", "device=cpu", "seed=1"],
                           tmp_path / "a", config_name="sample"))


def _image_folder(root: Path, per_class: int = 14) -> Path:
    rng = np.random.default_rng(0)
    for c, name in enumerate(("dark", "light")):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 120, (12, 12, 3)) + 120 * c
            Image.fromarray(pixels.astype(np.uint8)).save(root / name / f"{i}.png")
    return root


def test_metrics_on_an_image_folder_above_max_features(tmp_path):
    """A lazily decoded source: streamed statistics of every image, KID/PR on a subset, is_clf trains."""
    dm = ImageFolderDataModule(str(_image_folder(tmp_path / "images")), image_size=8, batch_size=4, val_size=4)
    scorer = make_generative_metrics(dm, metrics=("fid", "sfid", "kid", "pr", "is_clf"), feature="tiny",
                                     reference_n=24, pr_reference_n=10, cache_dir=tmp_path / "cache",
                                     classifier_epochs=1, batch_size=4)
    assert scorer.reference.n == 24 and scorer.reference.features.shape == (10, 64)
    fake = torch.randint(0, 256, (12, 3, 8, 8), dtype=torch.uint8)
    scores = scorer.compute(fake)
    assert set(scores) == {"fid", "sfid", "kid_mean", "kid_std", "precision", "recall", "is_clf_mean",
                           "is_clf_std"}
    assert all(np.isfinite(v) for v in scores.values())


def test_metric_callback_shares_sampling_over_ddp_ranks(tmp_path, capfd):
    """Under DDP every rank samples its share and rank 0 scores the gathered features (sFID included)."""
    cfg = compose_run([*TINY, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
                       "trainer.strategy=ddp_spawn", "trainer.max_steps=2", "callbacks=metrics",
                       "callbacks.sample_grid=null", "callbacks.generative_metrics.metrics=[fid,sfid]"], tmp_path)
    train(cfg)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert np.isfinite(saved["val/fid@6"]) and np.isfinite(saved["val/sfid@6"])
    assert "on 2 process(es)" in capfd.readouterr().err


def test_evaluation_benchmark_quick():
    """benchmarks/evaluation.py --quick: the 1 vs 2 process generation rows and the sFID cost table print."""
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-m", "benchmarks.evaluation", "--quick", "--threads", "1"], cwd=root,
                          capture_output=True, text=True, timeout=600, env={**os.environ, "WANDB_MODE": "offline"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "samples.npz byte-equal across the three: True" in proc.stdout
    assert "FID + sFID tap" in proc.stdout or "sFID part skipped" in proc.stdout


def test_torchrun_processes_and_other_shard_sizes_give_the_same_samples(tiny_ckpt, tmp_path):
    """Under torchrun Fabric joins the processes it started; shard and batch sizes do not change the bytes."""
    env = {**os.environ, "WANDB_MODE": "offline", "DDPM_CACHE_DIR": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    torchrun = Path(sys.executable).with_name("torchrun")
    args = [f"ckpt={tiny_ckpt}", "num_samples=6", "steps=2", "device=cpu"]
    proc = subprocess.run([str(torchrun), "--nproc_per_node=2", "-m", "ddpm_lightning.cli.sample", *args,
                           "shard_size=2", "batch_size=2", f"hydra.run.dir={tmp_path / 'torchrun'}"],
                          capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[rank 1/2]" in proc.stderr
    one = _run("sample", *args, "shard_size=4", "batch_size=3", out=tmp_path / "one", cache=tmp_path / "cache")
    assert one.returncode == 0, one.stderr[-3000:]
    assert (tmp_path / "torchrun" / "samples.npz").read_bytes() == (tmp_path / "one" / "samples.npz").read_bytes()


def test_sampling_time_counts_every_run_that_made_the_samples(tmp_path, monkeypatch):
    """A job interrupted mid-shard, rerun, then rerun once more with every shard kept: each result reports the
    seconds of generating all its samples (the interrupted part included), not only its own run's (the last
    rerun used to report 0 s and 0 samples/s, and the sweep report read that as the job's cost). A driven
    clock: 1 s per image. A shard whose time was never recorded (files from before the sidecars) makes it
    unknown (None), not wrong."""
    from types import SimpleNamespace

    from ddpm_lightning.cli.generation import sampling_time

    clock = SimpleNamespace(now=0.0, stop_at=None)
    monkeypatch.setattr(shards_module, "time", SimpleNamespace(perf_counter=lambda: clock.now))

    def sample_fn(n: int, first: int):
        if first == clock.stop_at:
            raise KeyboardInterrupt
        clock.now += n
        return torch.zeros(n, 1, 4, 4), torch.arange(first, first + n)

    def run():
        return shards_module.generate_shards(sample_fn, shards=tmp_path, num_samples=6, shard_size=2,
                                             batch_size=1, procs=shards_module.Processes(), log=lambda _: None)

    clock.stop_at = 3  # shard 0-1 written, sample 2 done, Ctrl-C before sample 3
    with pytest.raises(KeyboardInterrupt):
        run()
    assert sorted(p.name for p in tmp_path.glob("*.npz")) == ["000000000-000000002.npz",
                                                              "000000002-000000003.partial.npz"]
    clock.stop_at = None
    resumed = run()
    assert (resumed["generated"], resumed["skipped"], resumed["seconds"]) == (3, 3, 3.0)  # this run: 3-5
    assert sampling_time(resumed) == {"sampling_seconds": 6.0, "samples_per_second": 1.0}
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{a:09d}-{a + 2:09d}.{ext}" for a in (0, 2, 4)
                                                          for ext in ("json", "npz")]
    again = run()
    assert (again["generated"], again["seconds"]) == (0, 0.0)
    assert sampling_time(again) == {"sampling_seconds": 6.0, "samples_per_second": 1.0}
    (tmp_path / "000000002-000000004.json").unlink()
    assert sampling_time(run()) == {"sampling_seconds": None, "samples_per_second": None}
