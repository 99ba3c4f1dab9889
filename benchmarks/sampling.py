"""DDIM-25 sampling wall time per image: ours vs diffusers' DDIMScheduler + UNet2DModel, batch 16.

    python -m benchmarks.sampling            # both configs
    python -m benchmarks.sampling --quick    # smoke run

Contenders (interleaved rounds, medians):

* ``ours``: ``ddpm_lightning.sampling.sample_images(net, diffusion, 16, shape, SampleConfig(steps=25))`` with our
  UNet and a linear-schedule 1000-step ``GaussianDiffusion`` (the library's sampling path, as the CLI and the
  sample-grid callback call it);
* ``diffusers``: ``DDIMScheduler`` (linear betas 1e-4..0.02, 1000 steps, 25 inference steps, eta 0, clipped
  x0) stepping a ``UNet2DModel`` of the same architecture under ``torch.inference_mode``, as a diffusers
  pipeline does;
* ``diffusers-sched+our-net``: the diffusers loop around our UNet, which separates sampler from network cost;
* ``ours (precision=bf16)``: ``ours`` under bf16 autocast (``ddpm-sample/ddpm-eval precision=bf16``), on
  machines where ``trainer.precision=auto`` picks bf16 (AMX or AVX512-BF16 CPUs, bf16 GPUs).

Both samplers visit the same 25 timesteps (960, 920, ..., 0).

A second table times DPM-Solver++(2M) (``--solver-steps``, default 20, time-uniform steps 999, ~949, ...):
our loop (``GaussianDiffusion.dpm_solver_sample_loop`` over the ``sample.schedule=uniform`` process) against
diffusers' ``DPMSolverMultistepScheduler`` loop (``timestep_spacing="linspace"``, the same steps), both
around the same network: our UNet (``s/batch``), and a zero-cost network (``0.1 * x``) at the same tensor
shapes, whose loop time is the samplers' own per-step overhead (``overhead/step``; ``overhead vs diffusers``
= ours / theirs), measured in the same interleaved run. The two loops are checked to give the same samples.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Callable

import torch
from torch import nn

from ddpm_lightning.config.schema import SampleConfig
from ddpm_lightning.diffusion import GaussianDiffusion, make_beta_schedule
from ddpm_lightning.precision import resolve_precision
from ddpm_lightning.sampling import sample_images

from . import common


def ours_fn(net: nn.Module, config: common.ArchConfig, n: int, steps: int) -> Callable[[], torch.Tensor]:
    diffusion = GaussianDiffusion(make_beta_schedule("linear", 1000))
    classes = config.unet.get("num_classes")

    def run() -> torch.Tensor:
        settings = SampleConfig(method="ddim", steps=steps, eta=0.0, batch_size=n)
        return sample_images(net, diffusion, n, config.image_shape, settings, num_classes=classes, seed=0)[0]

    return run


def diffusers_fn(net: nn.Module, config: common.ArchConfig, n: int, steps: int) -> Callable[[], torch.Tensor]:
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=True,
                              set_alpha_to_one=True, timestep_spacing="leading")
    classes = config.unet.get("num_classes")

    @torch.inference_mode()
    def run() -> torch.Tensor:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn((n, *config.image_shape), generator=gen)
        y = torch.randint(0, classes, (n,), generator=gen) if classes else None
        scheduler.set_timesteps(steps)
        for t in scheduler.timesteps:
            eps = net(x, t.expand(n), y)
            x = scheduler.step(eps, t, x, eta=0.0).prev_sample
        return x

    return run


BF16 = "ours (precision=bf16)"


def _bf16(fn: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
    def run() -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return fn()

    return run


def measure_config(config: common.ArchConfig, n: int, steps: int, rounds: int) -> list[dict[str, object]]:
    ours_net = common.build_ours(config).eval()
    peer_net = common.DiffusersCall(common.build_diffusers(config)).eval()
    fns = {
        "ours": ours_fn(ours_net, config, n, steps),
        "diffusers": diffusers_fn(peer_net, config, n, steps),
        "diffusers-sched+our-net": diffusers_fn(ours_net, config, n, steps),
    }
    if resolve_precision("auto", "cpu") == "bf16-mixed":  # what `ddpm-sample precision=bf16` runs
        fns[BF16] = _bf16(ours_fn(ours_net, config, n, steps))
    warm = {"ours": ours_fn(ours_net, config, n, 2), "diffusers": diffusers_fn(peer_net, config, n, 2)}
    for fn in warm.values():  # warm-up: a 2-step run of each network
        fn()
    times = common.interleaved(fns, rounds, warmup=0)
    ours, peer = common.median(times["ours"]), common.median(times["diffusers"])
    rows = [{"config": config.name, "sampler": name, "batch": n, "steps": steps,
             "s/batch": common.median(t), "s/image": common.median(t) / n,
             "ours speed-up": common.median(t) / ours, "speed vs diffusers": peer / common.median(t)}
            for name, t in times.items()]
    for row in rows:  # the bf16 row is ours too (as shipped): "ours speed-up" over itself says nothing
        if row["sampler"] == BF16:
            row["ours speed-up"] = ""
    return rows


def solver_fns(net: nn.Module, config: common.ArchConfig, n: int, steps: int) -> dict[str, Callable[[], object]]:
    """Our DPM-Solver++(2M) loop, diffusers' scheduler loop and the bare network calls, on the same inputs."""
    from diffusers import DPMSolverMultistepScheduler

    from ddpm_lightning.sampling import sampling_process

    diffusion = GaussianDiffusion(make_beta_schedule("linear", 1000))
    process = sampling_process(diffusion, SampleConfig(method="dpm++2m", steps=steps, schedule="uniform"))
    classes = config.unet.get("num_classes")
    gen = torch.Generator().manual_seed(0)
    x_T = torch.randn((n, *config.image_shape), generator=gen)
    kwargs = {"y": torch.randint(0, classes, (n,), generator=gen)} if classes else {}
    scheduler = DPMSolverMultistepScheduler(num_train_timesteps=1000, trained_betas=diffusion.betas.numpy(),
                                            solver_order=2, algorithm_type="dpmsolver++", solver_type="midpoint",
                                            timestep_spacing="linspace", final_sigmas_type="zero")

    @torch.inference_mode()
    def ours() -> torch.Tensor:
        return process.dpm_solver_sample_loop(net, x_T.shape, order=2, noise=x_T, clip_denoised=False,
                                              model_kwargs=kwargs)

    @torch.inference_mode()
    def theirs() -> torch.Tensor:
        scheduler.set_timesteps(steps)
        x = x_T
        for t in scheduler.timesteps:
            x = scheduler.step(net(x, t.expand(n), **kwargs), t, x).prev_sample
        return x

    with torch.inference_mode():  # the two loops compute the same samples
        difference = float((ours() - theirs()).abs().max())
    if not difference <= 1e-3 * max(1.0, float(theirs().abs().max())):
        raise RuntimeError(f"DPM-Solver++(2M): ours and diffusers differ by {difference:.2e}")
    return {"ours dpm++2m": ours, "diffusers DPMSolverMultistep": theirs}


class NullNet(nn.Module):
    """A network that costs nothing: its loop time is the sampler's own overhead."""

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return 0.1 * x


def measure_solver(config: common.ArchConfig, n: int, steps: int, rounds: int) -> list[dict[str, object]]:
    net = common.build_ours(config).eval()
    fns = {f"{name} (UNet)": fn for name, fn in solver_fns(net, config, n, steps).items()}
    null = {f"{name} (null net)": fn for name, fn in solver_fns(NullNet(), config, n, steps).items()}
    times = common.interleaved({**fns, **null}, rounds, warmup=1)
    null_times = common.interleaved(null, 10 * rounds, warmup=1)  # cheap: more rounds for a stable median
    times.update(null_times)
    ours_step = common.median(null_times["ours dpm++2m (null net)"]) / steps
    theirs_step = common.median(null_times["diffusers DPMSolverMultistep (null net)"]) / steps
    rows = []
    for name, t in times.items():
        row = {"config": config.name, "loop": name, "batch": n, "steps": steps, "s/batch": common.median(t),
               "overhead/step (ms)": "", "overhead vs diffusers": ""}
        if name.endswith("(null net)"):
            step = ours_step if name.startswith("ours") else theirs_step
            row["overhead/step (ms)"], row["overhead vs diffusers"] = 1e3 * step, step / theirs_step
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(parser)
    parser.add_argument("--config", choices=sorted(common.CONFIGS), action="append",
                        help="architecture(s) to run (default: all)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--solver-steps", type=int, default=20, help="DPM-Solver++(2M) steps (0: skip)")
    args = parser.parse_args(argv)
    common.set_threads(args.threads)
    configs = [common.CONFIGS[c] for c in (args.config or common.CONFIGS)]
    n, steps, rounds, solver_steps = args.batch_size, args.steps, args.rounds or 3, args.solver_steps
    if args.quick:
        configs, n, steps, rounds, solver_steps = [common.quick(c) for c in configs], 2, 2, 1, min(solver_steps, 3)
    print(common.machine_line() + "\n")
    for config in configs:
        print(f"## {config.name}: DDIM-{steps}, batch {n}")
        print(common.table(measure_config(config, n, steps, rounds)))
        print(common.machine_line() + "\n")
        if solver_steps:
            print(f"## {config.name}: DPM-Solver++(2M)-{solver_steps} loops, batch {n}")
            print(common.table(measure_solver(config, n, solver_steps, rounds)))
            print(common.machine_line() + "\n")


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
