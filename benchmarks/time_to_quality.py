"""Time to quality: our default experiment vs the standard diffusers recipe, same wall-clock budget.

    python -m benchmarks.time_to_quality                 # 10 minutes of training each, FID@500
    python -m benchmarks.time_to_quality --quick         # 1 minute each, FID@100 (smoke run)
    python -m benchmarks.time_to_quality --skip-peer     # ours only

Both train on the same animal_mnist split (32x32, 1 channel, class-conditional), then sample
``--num-samples`` images with uniform class labels, and are scored with the same standard FID Inception
against the same cached 2,000-image training reference. The held-out-real floor and the noise ceiling are
reported on the same scale. Prints a table and saves both grids side by side as one PNG.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from ddpm_lightning.cli.compose import compose_run
from ddpm_lightning.data import AnimalMNISTDataModule
from ddpm_lightning.data.transforms import random_hflip, to_uint8
from ddpm_lightning.metrics import (
    GenerativeMetrics,
    load_feature_extractor,
    reference_stats,
)
from ddpm_lightning.modules.checkpoint import load_diffusion_module
from ddpm_lightning.sampling import resolve_sampler, save_grid


def fid_of(scorer: GenerativeMetrics, images_uint8: torch.Tensor) -> float:
    return float(scorer.compute(images_uint8)["fid"])


def balanced_labels(n: int, num_classes: int) -> torch.Tensor:
    return torch.arange(n) % num_classes


def run_ours(budget_s: float, out_dir: Path, num_samples: int, seed: int, extra: list[str]) -> dict:
    from ddpm_lightning.cli.train import train

    minutes, seconds = divmod(int(budget_s), 60)
    hours, minutes = divmod(minutes, 60)
    overrides = ["experiment=default", f"seed={seed}", f"trainer.max_time='00:{hours:02d}:{minutes:02d}:{seconds:02d}'",
                 "trainer.max_steps=1000000", "callbacks.generative_metrics.on_train_end=false",
                 "callbacks.sample_grid.on_train_end=false", *extra]  # in-loop FID and grids count
    cfg = compose_run(overrides, out_dir)
    start = time.perf_counter()
    train(cfg)
    train_s = time.perf_counter() - start
    ckpt = torch.load(out_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    module = load_diffusion_module(out_dir / "checkpoints" / "last.ckpt")
    start = time.perf_counter()
    settings = resolve_sampler(module.sample_settings, {"batch_size": 100})
    images, _ = module.sample(num_samples, settings, y=balanced_labels(num_samples, module.num_classes), seed=seed)
    sample_s = time.perf_counter() - start
    steps = int(ckpt["global_step"])
    batch = int(cfg.data.batch_size)
    return {"name": "ours (experiment=default)", "images": images, "steps": steps, "images_seen": steps * batch,
            "train_s": train_s, "img_per_s": steps * batch / train_s, "sample_s": sample_s,
            "sampler": f"{cfg.sample.method}-{cfg.sample.steps}",
            "params": sum(p.numel() for p in module.net.parameters())}


def run_diffusers(budget_s: float, datamodule: AnimalMNISTDataModule, num_samples: int, seed: int,
                  sampling_steps: int = 50) -> dict:
    """The diffusers example recipe scaled to this data (as in ../shared/ENV.md)."""
    from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel
    from diffusers.training_utils import EMAModel

    torch.manual_seed(seed)
    net = UNet2DModel(sample_size=32, in_channels=1, out_channels=1, block_out_channels=(32, 64, 64),
                      layers_per_block=2, down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
                      up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"), num_class_embeds=10)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
    ema = EMAModel(net.parameters(), decay=0.9999, use_ema_warmup=True, foreach=True)
    datamodule.setup("fit")
    loader = datamodule.train_dataloader()
    start, steps = time.perf_counter(), 0
    net.train()
    while time.perf_counter() - start < budget_s:
        for x, y in loader:
            x = random_hflip(x)
            noise = torch.randn_like(x)
            t = torch.randint(0, 1000, (x.shape[0],))
            pred = net(scheduler.add_noise(x, noise, t), t, class_labels=y).sample
            loss = torch.nn.functional.mse_loss(pred, noise)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            optimizer.step()
            ema.step(net.parameters())
            steps += 1
            if time.perf_counter() - start >= budget_s:
                break
    train_s = time.perf_counter() - start
    ema.copy_to(net.parameters())
    net.eval()
    ddim = DDIMScheduler.from_config(scheduler.config)
    ddim.set_timesteps(sampling_steps)
    generator = torch.Generator().manual_seed(seed)
    labels = balanced_labels(num_samples, 10)
    start = time.perf_counter()
    chunks = []
    with torch.inference_mode():
        for i in range(0, num_samples, 100):
            y = labels[i:i + 100]
            x = torch.randn(len(y), 1, 32, 32, generator=generator)
            for t in ddim.timesteps:
                x = ddim.step(net(x, t, class_labels=y).sample, t, x).prev_sample
            chunks.append(x.clamp(-1, 1))
    sample_s = time.perf_counter() - start
    batch = datamodule.batch_size
    return {"name": "diffusers recipe", "images": torch.cat(chunks), "steps": steps, "images_seen": steps * batch,
            "train_s": train_s, "img_per_s": steps * batch / train_s, "sample_s": sample_s,
            "sampler": f"ddim-{sampling_steps}", "params": sum(p.numel() for p in net.parameters())}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="training budget per contender")
    parser.add_argument("--quick", action="store_true", help="1 minute each, 100 samples (smoke run)")
    parser.add_argument("--num-samples", type=int, default=500)
    parser.add_argument("--reference-n", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-peer", action="store_true", help="train ours only")
    parser.add_argument("--out", type=Path, default=Path("outputs/time_to_quality"))
    parser.add_argument("--feature", default="inception", help="inception (standard FID network) or tiny")
    parser.add_argument("--override", action="append", default=[], help="extra ddpm-train override for ours")
    parser.add_argument("--peer-steps", type=int, default=50, help="DDIM steps of the diffusers recipe")
    parser.add_argument("--skip-anchors", action="store_true", help="do not score the held-out floor and noise ceiling")
    args = parser.parse_args(argv)
    if args.quick:
        args.minutes, args.num_samples = 1.0, 100
    torch.set_num_threads(2)
    budget_s = args.minutes * 60
    args.out.mkdir(parents=True, exist_ok=True)

    datamodule = AnimalMNISTDataModule(image_size=32, batch_size=64, val_size=1000, random_flip=True, seed=0)
    extractor = load_feature_extractor(args.feature)
    reference = reference_stats(lambda: datamodule.reference_images("train", args.reference_n),
                                data_name=datamodule.name, split="train", image_size=32, feature_extractor=extractor,
                                n=args.reference_n, progress=True)
    scorer = GenerativeMetrics(extractor, reference, ("fid",), batch_size=100, progress=True)
    held_out = datamodule.reference_images("val", args.num_samples)
    rows = [] if args.skip_anchors else [
        {"name": "held-out real (floor)", "fid": fid_of(scorer, held_out)},
        {"name": "uniform noise (ceiling)",
         "fid": fid_of(scorer, torch.randint(0, 256, (args.num_samples, 1, 32, 32), dtype=torch.uint8,
                                             generator=torch.Generator().manual_seed(args.seed)))}]
    contenders = [run_ours(budget_s, args.out / "ours", args.num_samples, args.seed, args.override)]
    if not args.skip_peer:
        contenders.append(run_diffusers(budget_s, datamodule, args.num_samples, args.seed, args.peer_steps))
    for result in contenders:
        result["fid"] = fid_of(scorer, to_uint8(result["images"]))
        rows.append(result)

    grids = [save_grid(r["images"][:100], args.out / f"{r['name'].split()[0]}_grid.png", nrow=10) for r in contenders]
    if len(grids) == 2:
        from PIL import Image

        left, right = (Image.open(g) for g in grids)
        side = Image.new("RGB", (left.width + right.width + 16, max(left.height, right.height)), "white")
        side.paste(left, (0, 0))
        side.paste(right, (left.width + 16, 0))
        side.save(args.out / "side_by_side.png")

    n = args.num_samples
    print(f"\ntime to quality on animal_mnist 32x32, {args.minutes:g} min of training each, FID@{n} "
          f"vs {args.reference_n} training images ({args.feature} features)")
    print(f"| contender | FID@{n} | steps | images seen | img/s | params | sampler | sampling s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "steps" in r:
            print(f"| {r['name']} | {r['fid']:.1f} | {r['steps']} | {r['images_seen']} | {r['img_per_s']:.1f} | "
                  f"{r['params'] / 1e6:.2f}M | {r['sampler']} | {r['sample_s']:.0f} |")
        else:
            print(f"| {r['name']} | {r['fid']:.1f} | | | | | | |")
    summary = [{k: v for k, v in r.items() if k != "images"} for r in rows]
    (args.out / "results.json").write_text(json.dumps(summary, indent=2, default=float))
    print(f"\ngrids: {', '.join(str(g) for g in grids)}" + (f"; side by side: {args.out / 'side_by_side.png'}"
                                                           if len(grids) == 2 else ""))


if __name__ == "__main__":
    main()
