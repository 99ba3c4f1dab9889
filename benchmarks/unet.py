"""UNet train-step and inference-step throughput: ours vs diffusers' UNet2DModel vs a straightforward ADM.

    python -m benchmarks.unet                      # both configs, the three models, tables
    python -m benchmarks.unet --config small-adm --profile      # + top ops of our train step
    python -m benchmarks.unet --ablations          # + the speed knobs (threads, channels_last, bf16, ...)
    python -m benchmarks.unet --quick              # smoke run
    python -m benchmarks.unet --config default-exp --bf16   # + the bf16 rows where precision=auto picks fp32

Where ``trainer.precision=auto`` picks bf16 autocast (or with ``--bf16``) the table adds ours as shipped and the
peers under the same autocast: "as shipped at equal precision", ratios printed under the table, and each bf16
row's FLOP rate as a share of the bf16 GEMM rate measured in the same rounds.

Train step = forward + eps-MSE loss + backward + AdamW step at the config's batch size; inference step =
one forward pass under ``torch.inference_mode``. Contenders run interleaved, one step each per round;
medians over rounds. GFLOP/s = FlopCounterMode's FLOPs of the step (convolutions, matmuls, attention) /
median step time, as a fraction of the fp32 2048^2 GEMM rate measured at the start of the same run.
Peak memory: torch allocations live during one step (``common.peak_memory_mb``).
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Callable

import torch
from torch import nn

from ddpm_lightning.precision import resolve_precision

from . import common
from .adm_reference import build_reference

CONTENDERS = ("ours", "diffusers", "adm-ref")


def build_contender(name: str, config: common.ArchConfig, like: nn.Module | None = None) -> nn.Module:
    """One contender at ``config`` (see benchmarks/README.md); ``adm-ref`` takes ``like``'s weights (ours)."""
    if name == "ours":
        return common.build_ours(config)
    if name == "diffusers":
        return common.DiffusersCall(common.build_diffusers(config))
    if name == "adm-ref":
        reference = build_reference(config.unet)
        if like is not None:
            reference.load_state_dict(like.state_dict())
        return reference
    raise ValueError(f"unknown contender {name!r}; allowed: {', '.join(CONTENDERS)}")


def contenders(config: common.ArchConfig) -> dict[str, nn.Module]:
    ours = build_contender("ours", config)
    return {"ours": ours, "diffusers": build_contender("diffusers", config),
            "adm-ref": build_contender("adm-ref", config, like=ours)}


def check_reference_matches(config: common.ArchConfig) -> float:
    """Max |ours - straightforward ADM| on a random batch, with every weight random (no zero init)."""
    ours = common.build_ours(config)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in ours.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    reference = build_reference(config.unet)
    reference.load_state_dict(ours.state_dict())
    inputs = common.make_inputs(config, batch_size=2)
    with torch.no_grad():
        a = ours(inputs["x"], inputs["t"], inputs["y"])
        b = reference(inputs["x"], inputs["t"], inputs["y"])
    return float((a - b).abs().max())


AS_SHIPPED = "ours (precision=auto)"
BF16 = " (bf16)"  # the peers under the same bf16 autocast as AS_SHIPPED


def _bf16_rows_wanted(force: bool) -> bool:
    """The bf16 rows run where ``trainer.precision=auto`` picks bf16 autocast (what the framework ships there), or
    when asked for (``--bf16``: a CPU without fast bf16 runs it emulated, slowly)."""
    return force or resolve_precision("auto", "cpu") == "bf16-mixed"


def measure_config(config: common.ArchConfig, rounds: int, gemm_n: int, *, memory: bool = True,
                   adamw: str = "default", bf16: bool = False) -> tuple[list[dict[str, object]], dict[str, float]]:
    """Rows of the main table and the GEMM rates (GFLOP/s: ``fp32``, and ``bf16`` with the bf16 rows) measured
    interleaved with the train steps.

    All contenders run fp32; where this machine's ``trainer.precision=auto`` (what the default experiment uses)
    resolves to bf16 autocast (or with ``bf16``), also ours as the framework runs it here (``AS_SHIPPED``) and the
    peers under the same autocast (``diffusers (bf16)``, ``adm-ref (bf16)``): "as shipped at equal precision", each
    bf16 row's FLOP rate as a share of the bf16 2048^2 GEMM rate measured in the same rounds."""
    models = contenders(config)
    inputs = common.make_inputs(config)
    n = config.batch_size
    train = {name: common.train_step_fn(m.train(), inputs, common.adamw(m, adamw)) for name, m in models.items()}
    infer = {name: common.inference_step_fn(m, inputs) for name, m in models.items()}
    a, b, out = torch.randn(gemm_n, gemm_n), torch.randn(gemm_n, gemm_n), torch.empty(gemm_n, gemm_n)
    gemms = {"gemm fp32": lambda: torch.mm(a, b, out=out)}
    if _bf16_rows_wanted(bf16):
        shipped = common.build_ours(config).train()
        peers = {AS_SHIPPED: shipped, **{name + BF16: build_contender(name, config, like=shipped).train()
                                         for name in CONTENDERS[1:]}}
        for name, model in peers.items():
            models[name] = model
            train[name] = _bf16(common.train_step_fn(model, inputs, common.adamw(model, adamw)))
            infer[name] = _bf16(common.inference_step_fn(model, inputs))
        a16, b16, out16 = a.bfloat16(), b.bfloat16(), out.bfloat16()
        gemms["gemm bf16"] = lambda: torch.mm(a16, b16, out=out16)
    train_t = common.interleaved({**train, **gemms}, rounds)
    peaks = {key.split()[1]: 2 * gemm_n**3 / common.median(train_t.pop(key)) / 1e9 for key in gemms}
    infer_t = common.interleaved(infer, rounds)
    rows = []
    for name, model in models.items():
        tr, inf = common.median(train_t[name]), common.median(infer_t[name])
        flops = common.count_flops(train[name])
        kind = "bf16" if name == AS_SHIPPED or name.endswith(BF16) else "fp32"
        row: dict[str, object] = {
            "config": config.name, "model": name, "params (M)": common.num_parameters(model) / 1e6,
            "batch": n, "train img/s": n / tr, "infer img/s": n / inf,
            "train GFLOP/s": flops / tr / 1e9, "% GEMM peak": 100 * flops / tr / 1e9 / peaks[kind],
            "GEMM": kind, "GFLOP/img (train)": flops / n / 1e9,
        }
        if memory:
            row["train peak MiB"] = common.peak_memory_mb(train[name])
            row["infer peak MiB"] = common.peak_memory_mb(infer[name])
        rows.append(row)
    by_name = {row["model"]: row for row in rows}
    for row in rows:  # ours against each row of its own precision
        ours = by_name[AS_SHIPPED if row["GEMM"] == "bf16" else "ours"]
        row["ours/this train"] = ours["train img/s"] / row["train img/s"]
        row["ours/this infer"] = ours["infer img/s"] / row["infer img/s"]
    return rows, peaks


def equal_precision_lines(rows: list[dict[str, object]], peaks: dict[str, float]) -> list[str]:
    """Ours as shipped against the peers: at equal precision (bf16 autocast, the headline) and against their fp32."""
    by_name = {row["model"]: row for row in rows}
    shipped = by_name.get(AS_SHIPPED)
    if shipped is None:
        return []
    lines = []
    for peer in CONTENDERS[1:]:
        for other, what in ((by_name.get(peer + BF16), "equal precision, bf16 autocast"), (by_name.get(peer), "fp32")):
            if other is not None:
                lines.append(f"{AS_SHIPPED} vs {other['model']} ({what}): train "
                             f"{shipped['train img/s'] / other['train img/s']:.2f}x, infer "
                             f"{shipped['infer img/s'] / other['infer img/s']:.2f}x")
    lines.append(f"{AS_SHIPPED}: {shipped['% GEMM peak']:.0f}% of the bf16 GEMM rate ({peaks['bf16']:.1f} GFLOP/s)")
    return lines


# ----------------------------------------------------------------------------------------------- knobs


def _bf16(fn: Callable[[], None]) -> Callable[[], None]:
    return common.autocast_bf16(fn, "cpu")


def _onednn_bf16_math(fn: Callable[[], None]) -> Callable[[], None]:
    """``fn`` with ``torch.backends.mkldnn.fp32_precision = "bf16"``: oneDNN may compute fp32 ops in bf16."""
    def run() -> None:
        before = torch.backends.mkldnn.fp32_precision
        torch.backends.mkldnn.fp32_precision = "bf16"
        try:
            fn()
        finally:
            torch.backends.mkldnn.fp32_precision = before

    return run


def _threads(fn: Callable[[], None], threads: int) -> Callable[[], None]:
    def run() -> None:
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            fn()
        finally:
            torch.set_num_threads(before)

    return run


def measure_ablations(config: common.ArchConfig, rounds: int, compile: bool = False,
                      bf16: bool = False) -> list[dict[str, object]]:
    """Our train and inference steps with one caller-side speed knob changed at a time, interleaved with the
    library defaults (``baseline``: NCHW, fp32, torch's AdamW default, torch's thread count). ``compile``:
    also ``torch.compile`` (what ``model.compile=true`` does), compiled and warmed up before the rounds. The bf16
    rows run where precision=auto picks bf16 or with ``bf16`` (``_bf16_rows_wanted``)."""
    inputs = common.make_inputs(config)
    train: dict[str, Callable[[], None]] = {}
    infer: dict[str, Callable[[], None]] = {}
    for name, memory_format, kind in (("baseline", torch.contiguous_format, "default"),
                                      ("channels_last", torch.channels_last, "default"),
                                      ("AdamW foreach", torch.contiguous_format, "foreach"),
                                      ("AdamW fused", torch.contiguous_format, "fused")):
        model = common.build_ours(config).to(memory_format=memory_format).train()
        batch = dict(inputs, x=inputs["x"].contiguous(memory_format=memory_format))
        train[name] = common.train_step_fn(model, batch, common.adamw(model, kind))
        if kind == "default":
            infer[name] = common.inference_step_fn(model, batch)
    if compile:
        model = common.build_ours(config).train()
        compiled = torch.compile(model)
        train["torch.compile"] = common.train_step_fn(compiled, inputs, common.adamw(model))
        infer["torch.compile"] = common.inference_step_fn(compiled, inputs)
        if _bf16_rows_wanted(bf16):  # autocast is a guard: a second pair of graphs
            train["torch.compile + bf16"] = _bf16(train["torch.compile"])
            infer["torch.compile + bf16"] = _bf16(infer["torch.compile"])
        start = time.perf_counter()  # compile outside the timed rounds: the train graphs, then the inference ones
        for _ in range(2):
            for name in [k for k in train if k.startswith("torch.compile")]:
                train[name]()
                infer[name]()
        print(f"torch.compile: compiled and warmed up in {time.perf_counter() - start:.0f} s")
    if _bf16_rows_wanted(bf16):  # not where bf16 would be emulated (an AVX2 CPU, or one held below bf16): minutes
        train["bf16 autocast"], infer["bf16 autocast"] = _bf16(train["baseline"]), _bf16(infer["baseline"])
        train["channels_last + bf16"] = _bf16(train["channels_last"])  # the knob where precision=auto picks bf16
        infer["channels_last + bf16"] = _bf16(infer["channels_last"])
        # oneDNN's implicit bf16 math inside fp32 ops (no autocast casts): meant for AMX tiles
        train["fp32, oneDNN bf16 math"] = _onednn_bf16_math(train["baseline"])
        infer["fp32, oneDNN bf16 math"] = _onednn_bf16_math(infer["baseline"])
    if torch.get_num_threads() > 1:
        train["1 thread"], infer["1 thread"] = _threads(train["baseline"], 1), _threads(infer["baseline"], 1)
    train_t, infer_t = common.interleaved(train, rounds), common.interleaved(infer, rounds)
    n = config.batch_size
    base_train, base_infer = common.median(train_t["baseline"]), common.median(infer_t["baseline"])
    rows = []
    for name, t in train_t.items():
        row: dict[str, object] = {"config": config.name, "knob": name, "train img/s": n / common.median(t),
                                  "train speed-up": base_train / common.median(t)}
        if name in infer_t:
            row["infer img/s"] = n / common.median(infer_t[name])
            row["infer speed-up"] = base_infer / common.median(infer_t[name])
        rows.append(row)
    return rows


def profile_train_step(config: common.ArchConfig, top: int = 15) -> str:
    model = common.build_ours(config).train()
    step = common.train_step_fn(model, common.make_inputs(config), common.adamw(model))
    step()
    averages = common.profiled(step).key_averages()
    total = sum(e.self_cpu_time_total for e in averages)
    rows = sorted(averages, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    return common.table([{"op": e.key, "calls": e.count, "self ms": e.self_cpu_time_total / 1e3,
                          "% self": 100 * e.self_cpu_time_total / total} for e in rows])


# ----------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(parser)
    parser.add_argument("--config", choices=sorted(common.CONFIGS), action="append",
                        help="architecture(s) to run (default: all)")
    parser.add_argument("--profile", action="store_true", help="print the top ops of our train step")
    parser.add_argument("--ablations", action="store_true", help="measure speed knobs on our train step")
    parser.add_argument("--compile", action="store_true", help="with --ablations: also torch.compile (minutes)")
    parser.add_argument("--adamw", default="default", choices=["default", "foreach", "fused", "single"])
    parser.add_argument("--no-memory", action="store_true", help="skip the profiler-based peak memory")
    parser.add_argument("--bf16", action="store_true",
                        help="the bf16 rows (ours as shipped and the peers under bf16 autocast) even where "
                             "precision=auto picks fp32 (they run on by default where it picks bf16)")
    args = parser.parse_args(argv)
    common.set_threads(args.threads)
    configs = [common.CONFIGS[c] for c in (args.config or common.CONFIGS)]
    if args.quick:
        configs = [common.quick(c) for c in configs]
    rounds = args.rounds or (1 if args.quick else 5)

    gemm_n = 256 if args.quick else 2048
    print(common.machine_line() + "\n")
    for config in configs:
        print(f"## {config.name}: {config.unet}  (straightforward ADM == ours to "
              f"{check_reference_matches(config):.1e})")
        rows, peaks = measure_config(config, rounds, gemm_n, memory=not args.no_memory, adamw=args.adamw,
                                     bf16=args.bf16)
        print(common.table(rows))
        print("\n".join(equal_precision_lines(rows, peaks)))
        for kind, peak in peaks.items():
            print(f"{kind} GEMM rate ({gemm_n}^2 matmul, interleaved with the train steps, median): {peak:.1f} GFLOP/s")
        print(common.machine_line() + "\n")
        if args.ablations:
            print(common.table(measure_ablations(config, rounds, compile=args.compile, bf16=args.bf16)) + "\n")
        if args.profile:
            print("top ops of our train step by self CPU time:")
            print(profile_train_step(config) + "\n")


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
