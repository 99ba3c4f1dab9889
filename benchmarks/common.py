"""Shared pieces of the benchmarks: the two architectures, the peer models, timing, FLOPs, memory, tables.

Timing discipline (the machines are small and shared): every measured callable runs once per round and the
rounds interleave the contenders (A B C, B C A, C A B, ...), so a burst of load from another process hits all
of them alike; we report the median over rounds. The machine's load average is printed with every table.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from ddpm_lightning.models import UNet

# ----------------------------------------------------------------------------------------------- configs


@dataclass(frozen=True)
class ArchConfig:
    """One ADM architecture, given as our UNet's constructor arguments, plus the benchmark batch size."""

    name: str
    batch_size: int
    unet: dict = field(default_factory=dict)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.unet["in_channels"], self.unet["image_size"], self.unet["image_size"])


# The ADM ablation-size model of ENV.md: 32x32x3, 64 ch, mult (1,2,2), 2 res blocks, attention at 16 and 8 px,
# 64 channels per head, AdaGN (scale-shift norm), BigGAN up/down. 8.0M parameters.
SMALL_ADM = ArchConfig(
    "small-adm", 32,
    dict(image_size=32, in_channels=3, out_channels=3, model_channels=64, channel_mult=(1, 2, 2),
         num_res_blocks=2, attention_resolutions=(16, 8), num_head_channels=64, use_scale_shift_norm=True,
         resblock_updown=True, use_new_attention_order=True, dropout=0.0),
)

# conf/experiment/default.yaml over conf/model/adm.yaml: 32x32x1 animal silhouettes, 10 classes, batch 32,
# one residual block per level; v prediction with a fixed variance -> out_channels 1.
DEFAULT_EXPERIMENT = ArchConfig(
    "default-exp", 32,
    dict(image_size=32, in_channels=1, out_channels=1, model_channels=32, channel_mult=(1, 2, 2),
         num_res_blocks=1, attention_resolutions=(8,), num_head_channels=32, use_scale_shift_norm=True,
         resblock_updown=True, use_new_attention_order=True, dropout=0.0, num_classes=10),
)

CONFIGS = {c.name: c for c in (SMALL_ADM, DEFAULT_EXPERIMENT)}


def quick(config: ArchConfig) -> ArchConfig:
    """The same architecture flags at 16 px, 32 channels, batch 2: for ``--quick`` smoke runs."""
    unet = dict(config.unet, image_size=16, model_channels=32, num_head_channels=32,
                attention_resolutions=tuple(r // 2 for r in config.unet["attention_resolutions"]))
    return ArchConfig(config.name, 2, unet)


def build_ours(config: ArchConfig) -> UNet:
    return UNet(**config.unet)


def build_diffusers(config: ArchConfig) -> nn.Module:
    """diffusers' ``UNet2DModel`` laid out like our UNet at ``config`` (see README for the mapping).

    ``attn_norm_num_groups=32`` is needed with ``resnet_time_scale_shift="scale_shift"``, or diffusers builds
    the middle block's attention without its GroupNorm.
    """
    from diffusers import UNet2DModel

    u = config.unet
    mult, mc = u["channel_mult"], u["model_channels"]
    widths = tuple(int(m * mc) for m in mult)
    sides = [u["image_size"] >> level for level in range(len(mult))]
    updown = u.get("resblock_updown", False)
    plain_down, plain_up = ("ResnetDownsampleBlock2D", "ResnetUpsampleBlock2D") if updown else (
        "DownBlock2D", "UpBlock2D")
    attn = [s in u["attention_resolutions"] for s in sides]
    if u.get("num_head_channels", -1) == -1:
        raise ValueError("build_diffusers needs num_head_channels (diffusers counts heads by their width)")
    return UNet2DModel(
        sample_size=u["image_size"], in_channels=u["in_channels"], out_channels=u["out_channels"],
        block_out_channels=widths, layers_per_block=u["num_res_blocks"],
        down_block_types=tuple("AttnDownBlock2D" if a else plain_down for a in attn),
        up_block_types=tuple("AttnUpBlock2D" if a else plain_up for a in reversed(attn)),
        downsample_type="resnet" if updown else "conv", upsample_type="resnet" if updown else "conv",
        attention_head_dim=u["num_head_channels"], norm_num_groups=32, attn_norm_num_groups=32,
        resnet_time_scale_shift="scale_shift" if u.get("use_scale_shift_norm") else "default",
        num_class_embeds=u.get("num_classes"), dropout=u.get("dropout", 0.0),
        flip_sin_to_cos=True, freq_shift=0,
    )


class DiffusersCall(nn.Module):
    """``model(x, t, y)`` -> tensor, the calling convention of our UNet, over a ``UNet2DModel``."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return self.net(x, t, class_labels=y, return_dict=False)[0]


def num_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def make_inputs(config: ArchConfig, batch_size: int | None = None, seed: int = 0,
                device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """x_t, t, y (or None) and the target noise for one batch, from a fixed seed (drawn on the CPU, then moved
    to ``device``: the same numbers on every device)."""
    n = batch_size or config.batch_size
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((n, *config.image_shape), generator=gen)
    eps = torch.randn((n, *config.image_shape), generator=gen)
    t = torch.randint(0, 1000, (n,), generator=gen)
    classes = config.unet.get("num_classes")
    y = torch.randint(0, classes, (n,), generator=gen) if classes else None
    inputs = {"x": x, "t": t, "y": y, "eps": eps}
    return {k: None if v is None else v.to(device) for k, v in inputs.items()}


# ----------------------------------------------------------------------------------------------- steps


def train_step_fn(model: nn.Module, inputs: dict, optimizer: torch.optim.Optimizer) -> Callable[[], None]:
    """forward + eps-MSE loss + backward + optimizer step (the work of one training iteration)."""
    x, t, y, eps = inputs["x"], inputs["t"], inputs["y"], inputs["eps"]

    def step() -> None:
        loss = torch.nn.functional.mse_loss(model(x, t, y), eps)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def inference_step_fn(model: nn.Module, inputs: dict) -> Callable[[], None]:
    x, t, y = inputs["x"], inputs["t"], inputs["y"]

    def step() -> None:
        with torch.inference_mode():
            model(x, t, y)

    return step


def autocast_bf16(fn: Callable[[], object], device_type: str = "cpu") -> Callable[[], None]:
    """``fn`` under bf16 autocast on ``device_type`` (what ``trainer.precision=bf16-mixed`` does to a step)."""

    def run() -> None:
        with torch.autocast(device_type, dtype=torch.bfloat16):
            fn()

    return run


def synchronized(fn: Callable[[], object], device: torch.device | str) -> Callable[[], None]:
    """``fn`` followed by a wait for the device's queued work (CUDA kernels run asynchronously): what a timer
    around the call must measure. On the CPU, ``fn`` itself."""
    if torch.device(device).type != "cuda":
        return fn

    def run() -> None:
        fn()
        torch.cuda.synchronize(device)

    return run


def adamw(model: nn.Module, kind: str = "default") -> torch.optim.Optimizer:
    """AdamW with torch's default implementation choice, or forced ``foreach`` / ``fused``."""
    kw = {"default": {}, "foreach": {"foreach": True}, "fused": {"fused": True}, "single": {"foreach": False}}
    if kind not in kw:
        raise ValueError(f"unknown AdamW kind {kind!r}; allowed: {', '.join(kw)}")
    return torch.optim.AdamW(model.parameters(), lr=1e-4, **kw[kind])


# ----------------------------------------------------------------------------------------------- timing


def interleaved(fns: dict[str, Callable[[], object]], rounds: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each callable, over ``rounds`` interleaved rounds after ``warmup`` untimed ones.

    The order rotates from round to round (A B C, B C A, C A B, ...) so that no contender always runs right
    after the same other one (e.g. into the page faults of re-allocating what the previous one freed).
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    names = list(fns)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            start = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - start)
    return times


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def matmul_gflops(n: int, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                  repeats: int = 5) -> float:
    """GFLOP/s of an ``n`` x ``n`` ``torch.mm`` in ``dtype`` on ``device``: the median of ``repeats`` timed calls
    after one warm-up (on CUDA, synchronised). The "peak" that a network's FLOP rate is compared with."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    step = synchronized(lambda: torch.mm(a, b, out=out), device)
    seconds = interleaved({"mm": step}, rounds=repeats)["mm"]
    return 2 * n**3 / median(seconds) / 1e9


# ----------------------------------------------------------------------------------------------- FLOPs

_aten = torch.ops.aten


def _cpu_flash_fwd(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_flash_bwd(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


# torch's flop registry has no entry for the CPU flash-attention kernel (it would count attention as 0 FLOPs).
# FlopCounterMode passes tensor shapes to custom formulas.
SDPA_CPU_FLOPS = {
    _aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_fwd,
    _aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_flash_bwd,
}


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of one call of ``fn`` (matmuls, convolutions and attention; elementwise ops count 0)."""
    with FlopCounterMode(display=False, custom_mapping=SDPA_CPU_FLOPS) as counter:
        fn()
    return counter.get_total_flops()


# ----------------------------------------------------------------------------------------------- memory


@contextlib.contextmanager
def quiet_stderr():
    """Silence file descriptor 2 (the profiler's C++ start/stop log lines) for the duration of the block."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def profiled(fn: Callable[[], object], **kwargs) -> torch.profiler.profile:
    """Run ``fn`` once under ``torch.profiler.profile(activities=[CPU], **kwargs)``; return the profiler."""
    from torch.profiler import ProfilerActivity, profile

    with quiet_stderr(), profile(activities=[ProfilerActivity.CPU], **kwargs) as prof:
        fn()
    return prof


def peak_memory_mb(fn: Callable[[], object], device: torch.device | str = "cpu") -> float:
    """Peak of live torch allocations during one call of ``fn``, above what was live before it (MiB).

    On CUDA: the caching allocator's own counters (``max_memory_allocated`` after a reset, minus what was
    allocated before the call). On the CPU:

    Measured with ``torch.profiler(profile_memory=True)``: its raw ``[memory]`` records (+bytes on each
    allocation, -bytes on each free) are summed in time order and the running maximum is taken. This counts
    tensors only (activations, gradients, optimizer state created in the step, temporaries), not the
    allocator's or the interpreter's overhead. ``tracemalloc`` does not see torch's allocations at all, and
    ``ru_maxrss`` is a process-lifetime high-water mark that cannot separate two models run in one process.
    """
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    prof = profiled(fn, profile_memory=True)
    records = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                     if e.name() == "[memory]" and str(e.device_type()).endswith("CPU"))
    live = peak = 0
    for _, nbytes in records:
        live += nbytes
        peak = max(peak, live)
    return peak / 2**20


# ----------------------------------------------------------------------------------------------- output


def add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: tiny configs, batch 2, one round (numbers are meaningless)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's choice, the number of cores)")
    parser.add_argument("--rounds", type=int, default=None, help="timed interleaved rounds per contender")


def set_threads(threads: int | None) -> int:
    if threads is not None:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def machine_line() -> str:
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    return (f"torch {torch.__version__}, {torch.get_num_threads()} threads on {os.cpu_count()} cores "
            f"({platform.processor() or platform.machine()}, {torch.backends.cpu.get_cpu_capability()}), "
            f"load average {load}")


def table(rows: list[dict[str, object]], columns: Sequence[str] | None = None) -> str:
    """A GitHub-markdown table of ``rows`` (floats printed with 3 significant digits)."""
    if not rows:
        return ""
    columns = list(columns or rows[0].keys())

    def fmt(v: object) -> str:
        if isinstance(v, float):
            if v == 0 or not math.isfinite(v):
                return str(v)
            digits = max(0, 2 - int(math.floor(math.log10(abs(v)))))
            return f"{v:.{digits}f}"
        return str(v)

    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) + " |" for row in cells]
    return "\n".join(lines)
