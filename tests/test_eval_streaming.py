"""Evaluation at scale, continued: ``samples=<file.npz>`` read a batch at a time (never the whole array), the
reference statistics shared by processes (bit-equal to one process), ``devices=2`` inside a Hydra multirun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from run_config import TINY, compose_run

from ddpm_lightning.cli.evaluate import evaluate
from ddpm_lightning.cli.generation import open_samples
from ddpm_lightning.cli.train import train
from ddpm_lightning.metrics import GenerativeMetrics, make_generative_metrics, metric_name, write_npz
from ddpm_lightning.metrics.npz import iter_npz_rows, npz_member

DIGITS = ["data=digits", "data.image_size=16", "data.limit=96"]
SCORE = ["feature=tiny", "reference_n=40", "pr_reference_n=24", "metrics=[fid,sfid,kid,pr]"]


def _images(n: int, size: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3)).astype(np.uint8)


@pytest.mark.parametrize("writer", ["savez", "savez_compressed", "write_npz"])
def test_npz_rows_are_read_chunk_by_chunk(tmp_path, writer):
    arr, labels = _images(103, 8), np.arange(103, dtype=np.int64)
    path = tmp_path / "s.npz"
    if writer == "write_npz":
        write_npz(path, {"arr_0": arr, "arr_1": labels})
    else:
        getattr(np, writer)(path, arr, labels)
    assert npz_member(path, "arr_0") == ((103, 8, 8, 3), np.dtype(np.uint8))
    chunks = list(iter_npz_rows(path, "arr_0", 10))
    assert [len(c) for c in chunks] == [10] * 10 + [3]
    np.testing.assert_array_equal(np.concatenate(chunks), arr)
    np.testing.assert_array_equal(np.concatenate(list(iter_npz_rows(path, "arr_0", 7, start=40, stop=61))),
                                  arr[40:61])
    np.testing.assert_array_equal(np.concatenate(list(iter_npz_rows(path, "arr_1", 64))), labels)
    with pytest.raises(KeyError, match="has no array 'arr_9'"):
        npz_member(path, "arr_9")


def test_npz_reader_never_holds_the_whole_array(tmp_path):
    """Peak numpy memory while streaming a 12 MB member in 64-row chunks stays at a few chunks."""
    arr = _images(4000, 32)  # 12.3 MB
    path = tmp_path / "big.npz"
    np.savez(path, arr)
    chunk_bytes = 64 * 32 * 32 * 3
    del arr
    tracemalloc.start()
    try:
        rows = 0
        for chunk in iter_npz_rows(path, "arr_0", 64):
            rows += len(chunk)
            assert chunk.nbytes <= chunk_bytes
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert rows == 4000
    assert peak < 4 * chunk_bytes + 1_000_000, peak  # the file is 12 MB; a chunk 196 KB


def test_samples_npz_is_scored_in_batches_equal_to_the_in_memory_path(tmp_path, monkeypatch):
    """ddpm-eval samples=<npz> with a batch size smaller than the file: one batch in memory at a time, the
    metrics those of the whole array scored in memory."""
    arr = _images(1000, 16, seed=1)
    labels = np.random.default_rng(2).integers(0, 10, 1000)
    path = tmp_path / "samples.npz"
    np.savez(path, arr, labels)
    seen: list[int] = []
    outputs = GenerativeMetrics.outputs

    def counting(self, batch):
        seen.append(len(batch))
        return outputs(self, batch)

    monkeypatch.setattr(GenerativeMetrics, "outputs", counting)
    monkeypatch.setenv("DDPM_CACHE_DIR", str(tmp_path / "cache"))
    cfg = compose_run([f"samples={path}", *DIGITS, *SCORE, "batch_size=64"], tmp_path / "eval", config_name="eval")
    streamed = evaluate(cfg)["metrics"]
    assert max(seen) == 64 and sum(seen) == 1000  # never the whole file at once
    source = open_samples(path)
    assert (source.count, source.shape) == (1000, (3, 16, 16))
    torch.testing.assert_close(source.labels, torch.from_numpy(labels.astype(np.int64)))

    datamodule = instantiate(cfg.data)
    scorer = make_generative_metrics(datamodule, metrics=("fid", "sfid", "kid", "pr"), feature="tiny",
                                     reference_n=40, pr_reference_n=24, cache_dir=cfg.cache_dir, batch_size=64)
    in_memory = scorer.compute(torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous())
    assert streamed == {metric_name(k, 1000): v for k, v in in_memory.items()}


def test_samples_image_folder_is_decoded_in_batches(tmp_path):
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    arr = _images(9, 16)
    for i, image in enumerate(arr):
        Image.fromarray(image).save(folder / f"{i:03d}.png")
    source = open_samples(folder)
    batches = list(source.batches(4))
    assert [len(b) for b in batches] == [4, 4, 1] and source.shape == (3, 16, 16)
    np.testing.assert_array_equal(torch.cat(batches).permute(0, 2, 3, 1).numpy(), arr)


def test_a_truncated_samples_file_is_one_clear_error(tmp_path):
    path = tmp_path / "s.npz"
    np.savez(path, _images(50, 16))
    data = path.read_bytes()
    Path(tmp_path / "half.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="not a readable .npz"):
        open_samples(tmp_path / "half.npz")


# ------------------------------------------------------------------ reference statistics shared by processes
def _real(n: int = 37) -> torch.Tensor:
    return torch.from_numpy(_images(n, 16, seed=3)).permute(0, 3, 1, 2).contiguous()


def _reference(real: torch.Tensor, cache: Path, rank: int = 0, world: int = 1):
    from ddpm_lightning.metrics import load_feature_extractor, reference_stats

    return reference_stats(lambda: iter(real.split(5)), data_name="toy", split="train", image_size=16,
                           feature_extractor=load_feature_extractor("tiny"), n=len(real), cache_dir=cache,
                           batch_size=4, max_features=30, image_range=lambda s, e: iter(real[s:e].split(3)),
                           rank=rank, world_size=world, chunk=6)


def _reference_worker(rank: int, world: int, port: int, cache: str, out: str) -> None:
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        stats = _reference(_real(), Path(cache), rank, world)
        np.savez(Path(out) / f"rank{rank}.npz", mu=stats.mu, sigma=stats.sigma, mu_s=stats.mu_s,
                 sigma_s=stats.sigma_s, features=stats.features)
        again = _reference(_real(), Path(cache), rank, world)  # rank 0's cache hit, for every rank
        assert np.array_equal(again.sigma, stats.sigma)
    finally:
        torch.distributed.destroy_process_group()


def test_reference_statistics_shared_by_two_processes_equal_one_process(tmp_path):
    """Two gloo processes share the reference feature pass (blocks of 8 images: rank r takes blocks k % 2 == r)
    and every rank gets statistics bit-equal to one process's."""
    import socket

    import torch.multiprocessing as mp

    one = _reference(_real(), tmp_path / "one")
    assert one.n == 37 and one.features.shape == (30, 64)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_reference_worker, args=(2, port, str(tmp_path / "two"), str(tmp_path)), nprocs=2)
    for rank in range(2):
        with np.load(tmp_path / f"rank{rank}.npz") as got:
            for key in ("mu", "sigma", "mu_s", "sigma_s", "features"):
                np.testing.assert_array_equal(got[key], getattr(one, key), err_msg=f"rank {rank} {key}")
    assert len(list((tmp_path / "two" / "fid_stats").glob("*.npz"))) == 1  # rank 0 wrote the cache


# ------------------------------------------------------------------ devices=2 inside a Hydra multirun
@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("train")
    train(compose_run([*TINY, "trainer.max_steps=2"], out))
    return out / "checkpoints" / "last.ckpt"


def test_multirun_jobs_each_shard_over_two_processes(tiny_ckpt, tmp_path):
    """``ddpm-eval -m ... sample.seed=0,1 devices=2``: every job starts its own 2 processes running that job
    alone (not the sweep again), and job 0 equals the same evaluation run on one process."""
    env = {**os.environ, "WANDB_MODE": "offline", "DDPM_CACHE_DIR": str(tmp_path / "cache")}
    args = [f"ckpt={tiny_ckpt}", "num_samples=5", "steps=2", "shard_size=2", "batch_size=2", "feature=tiny",
            "reference_n=20", "pr_reference_n=10", "metrics=[fid,sfid]", "device=cpu"]
    sweep = tmp_path / "sweep"
    done = subprocess.run([sys.executable, "-m", "ddpm_lightning.cli.evaluate", "-m", *args, "sample.seed=0,1",
                           "devices=2", f"hydra.sweep.dir={sweep}"], capture_output=True, text=True, timeout=600,
                          env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    results = [json.loads((sweep / str(job) / "results.json").read_text()) for job in (0, 1)]
    assert [r["generation"]["world_size"] for r in results] == [2, 2]
    assert done.stderr.count("[rank 1/2]") >= 2 and not list(tmp_path.glob("multirun"))  # no rank re-ran the sweep
    assert (sweep / "0" / "samples.npz").read_bytes() != (sweep / "1" / "samples.npz").read_bytes()
    one = subprocess.run([sys.executable, "-m", "ddpm_lightning.cli.evaluate", *args, "sample.seed=0", "devices=1",
                          f"hydra.run.dir={tmp_path / 'one'}"], capture_output=True, text=True, timeout=600,
                         env=env, cwd=tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    assert (tmp_path / "one" / "samples.npz").read_bytes() == (sweep / "0" / "samples.npz").read_bytes()
    assert json.loads((tmp_path / "one" / "results.json").read_text())["metrics"] == results[0]["metrics"]
