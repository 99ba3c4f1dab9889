"""The cost of a checkpoint series (``ddpm-eval ckpts=<run>``) on this machine, and what one process saves.

    python -m benchmarks.checkpoint_series            # tiny run, 4 checkpoints, 200 samples each, feature=inception
    python -m benchmarks.checkpoint_series --quick    # smoke run (2 checkpoints, 6 samples, tiny features)

A short tiny training keeps a checkpoint every few steps (``callbacks.periodic_checkpoint``). Then, into fresh
folders with a fresh cache each:

1. ``series``: ``ddpm-eval ckpts=<run>``, one process: the data set, the feature extractor and the reference
   statistics are built once (the first checkpoint pays for the statistics) and reused by the others;
2. ``per-ckpt``: one ``ddpm-eval ckpt=<file>`` process per checkpoint, sharing only the on-disk statistics cache
   (the first process computes them, the others read them): each pays the start-up, imports, the extractor and
   the cache read.

Prints the wall time of each, samples/s over the whole series, and the ratio per-ckpt / series.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ddpm_lightning.cli.compose import compose_run
from ddpm_lightning.cli.series import series_checkpoints
from ddpm_lightning.cli.train import train

TINY = ["data=digits", "data.image_size=16", "data.batch_size=8", "data.limit=96", "model.model_channels=32",
        "model.channel_mult=[1,2]", "model.num_res_blocks=1", "model.attention_resolutions=[8]",
        "model.num_head_channels=-1", "model.num_heads=1", "diffusion.num_timesteps=50",
        "trainer.limit_val_batches=1", "trainer.enable_progress_bar=false", "callbacks.progress_bar=null",
        "callbacks.sample_grid.every_n_steps=0", "callbacks.sample_grid.num_samples=2",
        "callbacks.periodic_checkpoint.save_top_k=-1"]


def train_run(folder: Path, checkpoints: int, every: int) -> Path:
    steps = checkpoints * every
    train(compose_run([*TINY, f"trainer.max_steps={steps}", f"trainer.val_check_interval={steps}",
                       f"callbacks.periodic_checkpoint.every_n_train_steps={every}"], folder,
                      cache_dir=folder / "cache"))
    return folder


def _eval(args: list[str], cache: Path, threads: int) -> float:
    env = {**os.environ, "WANDB_MODE": "offline", "DDPM_CACHE_DIR": str(cache), "OMP_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "ddpm_lightning.cli.evaluate", *args], capture_output=True,
                          text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 checkpoints, 6 samples, tiny features")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--samples", type=int, default=None)
    args = parser.parse_args()
    count, samples = (2, 6) if args.quick else (4, 200)
    samples = args.samples or samples
    feature = ["feature=tiny", "reference_n=24"] if args.quick else ["feature=inception", "reference_n=1000"]
    common = [f"num_samples={samples}", "steps=10", "metrics=[fid,kid]", "batch_size=50", "device=cpu", *feature]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        run = train_run(root / "run", count, 2)
        series = series_checkpoints(str(run))
        one = _eval([f"ckpts={run}", *common, f"hydra.run.dir={root / 'series'}"], root / "cache-series",
                    args.threads)
        each = sum(_eval([f"ckpt={path}", *common, f"hydra.run.dir={root / f'per-{step}'}"], root / "cache-per",
                         args.threads) for step, path in series)
    total = samples * len(series)
    print(f"checkpoint series: {len(series)} checkpoints x {samples} samples, {' '.join(common)}, "
          f"{args.threads} threads")
    print(f"  series (one process):     {one:7.1f} s  {total / one:6.2f} samples/s")
    print(f"  per-ckpt (one process each): {each:7.1f} s  {total / each:6.2f} samples/s")
    print(f"  per-ckpt / series: {each / one:.2f}x (saved {each - one:.1f} s: start-up, imports, extractor and "
          f"reference statistics paid once)")


if __name__ == "__main__":
    main()
