"""The framework on a GPU in one command: ``make gpu-check`` (``python -m benchmarks.gpu_check``).

    python -m benchmarks.gpu_check                          # on the GPU: < 8 minutes; report in results/gpu/
    python -m benchmarks.gpu_check --device cpu --quick     # every step tiny on the CPU (~1-2 min; the test suite)
    python -m benchmarks.gpu_check --only throughput,eval   # some steps (names below)

Steps, in order; each is isolated (an exception or a bad value is one ``failed: <step>: <message>`` line in the
report, and the check goes on); the exit code is 1 when any step failed:

1. ``environment``: GPU model and count, memory, CUDA, cuDNN, NCCL, torch, driver, bf16/TF32 support, CPU, code commit.
2. ``throughput``: train img/s (forward + eps-MSE + backward + AdamW) of the default experiment's network and the
   small ADM at their batch size, under ``bf16-mixed`` and fp32 (TF32 on the GPU), ours against diffusers'
   ``UNet2DModel`` and the straightforward ADM (``benchmarks.unet``'s contenders) in the same interleaved rounds,
   with peak memory and the share of this device's bf16 matmul rate reached (eager).
3. ``train``: ``ddpm-train experiment=default trainer=gpu`` for a few hundred steps with the in-loop score
   (``val/fid@100`` at every validation), its steps/s (``benchmarks.step_timer``) and FID@500 at the end.
4. ``ddp_resume``: ``trainer=ddp`` on one device (NCCL on a GPU, gloo on the CPU): 2 steps, then resumed to 4
   (``resume=auto``), against 4 uninterrupted steps: the weights, EMA and AdamW moments compared (bit-exact, or the
   largest difference and the ops that have no deterministic kernel), with the determinism settings used.
5. ``eval``: ``ddpm-eval`` of 2,000 samples of the ``train`` checkpoint on the device, samples/s and FID; then
   the same samples' features recomputed on the CPU (they must agree to float tolerance) and their FID.
6. ``throughput_compile``: step 2 under ``torch.compile``, within what is left of the time budget (``--budget-min``:
   rows that would not fit are listed as skipped, not failed).

``--quick`` makes every step tiny: the benchmark networks at 16 px and batch 2, one round; 4 training steps of the
default experiment's network on 96 digits at 16 px; a 64-d stand-in feature extractor (``feature=tiny``) instead
of Inception; 8 samples; ``torch.compile`` with the ``aot_eager`` backend (dynamo + AOTAutograd, no code
generation). Its numbers mean nothing; it keeps every code path of the check alive between GPU runs.

Writes ``report.json`` and ``report.md`` into ``--out`` (after every step, so a killed check leaves what it had);
every key of ``report.json`` is described in benchmarks/README.md ("GPU check"). The runs' folders (checkpoints,
samples, logs) go to ``--work`` (default: a temporary folder, removed at the end unless ``--keep-work``).
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from . import common, unet

ROOT = Path(__file__).resolve().parents[1]
STEPS = ("environment", "throughput", "train", "ddp_resume", "eval", "throughput_compile")
SCHEMA = 1
PRECISIONS = ("bf16-mixed", "32-true")

# --quick: the default experiment's recipe on a tiny data set and network (as the test suite's tiny runs)
QUICK_RUN = ["data=digits", "data.image_size=16", "data.batch_size=8", "data.limit=96", "model.channel_mult=[1,2]",
             "diffusion.num_timesteps=50", "trainer.limit_val_batches=1", "callbacks.sample_grid.every_n_steps=0",
             "callbacks.sample_grid.per_class=1", "callbacks.sample_grid.steps=2"]
QUICK_SCORING = ["callbacks.generative_metrics.feature=tiny", "callbacks.generative_metrics.reference_n=24",
                 "callbacks.generative_metrics.metrics=[fid]", "callbacks.generative_metrics.steps=2",
                 "callbacks.generative_metrics.batch_size=8"]
QUIET = ["trainer.enable_progress_bar=false", "callbacks.progress_bar=null"]
EXCEPTION_LINE = re.compile(r"^[A-Za-z_.]*(Error|Exception|Interrupt)\b.*:")
NONDETERMINISTIC = re.compile(r"(\w+) does not have a deterministic implementation")


class CheckError(Exception):
    """A step's failure, already phrased as its one report line."""


# ------------------------------------------------------------------------------------------------------ plan


@dataclass
class Plan:
    """What every step runs, at full size or ``--quick``."""

    device: torch.device
    quick: bool
    out: Path
    work: Path
    cache_dir: Path
    budget_s: float
    steps: tuple[str, ...]
    compile_backend: str
    train_steps: int
    eval_samples: int
    ddp_devices: int
    threads: int | None = None
    rounds_arg: int | None = None
    started: float = field(default_factory=time.monotonic)
    checkpoints: list[Path] = field(default_factory=list)  # written by train / ddp_resume, scored by eval
    flops: dict[tuple[str, str], int] = field(default_factory=dict)  # (config, model) -> FLOPs of a train step
    rates: dict[str, float] = field(default_factory=dict)  # this device's matmul TFLOP/s, measured once

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def configs(self) -> list[common.ArchConfig]:
        configs = [common.DEFAULT_EXPERIMENT, common.SMALL_ADM]
        return [common.quick(c) for c in configs] if self.quick else configs

    @property
    def rounds(self) -> int:
        return self.rounds_arg or (1 if self.quick else 5)

    @property
    def calls_per_round(self) -> int:  # GPU steps of small networks take milliseconds: time 10 in a row
        return 10 if self.cuda else 1

    @property
    def compile_groups(self) -> list[tuple[common.ArchConfig, str]]:
        """(config, precision) blocks of the compiled step, most important first: bf16 before fp32 (the budget
        may cut the end). --quick: the default experiment's network in bf16, ours alone (the same code path)."""
        groups = [(config, precision) for precision in PRECISIONS for config in self.configs]
        return groups[:1] if self.quick else groups

    @property
    def compile_contenders(self) -> tuple[str, ...]:
        return ("ours",) if self.quick else unet.CONTENDERS

    @property
    def feature(self) -> str:
        return "tiny" if self.quick else "inception"

    @property
    def reference_n(self) -> int:
        return 24 if self.quick else 2000

    @property
    def in_loop_samples(self) -> int:
        return 6 if self.quick else 100

    @property
    def final_samples(self) -> int:
        return 8 if self.quick else 500

    @property
    def val_every(self) -> int:
        return max(1, self.train_steps // 2)

    def remaining_s(self) -> float:
        return self.budget_s - (time.monotonic() - self.started)

    def run_overrides(self) -> list[str]:
        return [*(QUICK_RUN if self.quick else []), *QUIET]

    def env(self) -> dict[str, str]:
        path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
        env = {**os.environ, "WANDB_MODE": "disabled", "HYDRA_FULL_ERROR": "0", "DDPM_CACHE_DIR": str(self.cache_dir),
               "PYTHONPATH": path}
        if self.threads is not None:
            env["OMP_NUM_THREADS"] = str(self.threads)
        return env


# ------------------------------------------------------------------------------------------------ commands


def error_line(text: str) -> str:
    """A failed command's own one-line message (``error: ...``), else the last exception line, else its last line
    (Hydra's "Set the environment variable HYDRA_FULL_ERROR=1 ..." hint skipped)."""
    lines = [line.strip() for line in text.splitlines() if line.strip() and "HYDRA_FULL_ERROR" not in line]
    errors = [line for line in lines if line.startswith("error:")]
    exceptions = [line for line in lines if EXCEPTION_LINE.match(line)]
    line = (errors or exceptions or lines or ["no output"])[-1]
    return line[:400]


def run_command(plan: Plan, argv: list[str], log: Path, timeout_s: float) -> str:
    """Run a real CLI (its own process group, output in ``log``); its output, or CheckError with its message."""
    log.parent.mkdir(parents=True, exist_ok=True)
    shown = argv[2] if argv[1:2] == ["-m"] else argv[0]
    with open(log, "w") as handle:
        proc = subprocess.Popen(argv, stdout=handle, stderr=subprocess.STDOUT, cwd=ROOT, env=plan.env(),
                                start_new_session=True)
        try:
            code = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _stop_group(proc)
            raise CheckError(f"{shown} ran past {timeout_s:.0f} s and was stopped (log: {log})") from None
        except BaseException:
            _stop_group(proc)
            raise
    text = log.read_text(errors="replace")
    if code != 0:
        raise CheckError(f"{shown} exited with code {code}: {error_line(text)}")
    return text


def _stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the command's process group (its DDP ranks too), SIGKILL after 10 s."""
    for sig, wait_s in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def train_cli() -> list[str]:
    return [sys.executable, "-m", "ddpm_lightning.train"]


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise CheckError(f"{path.name} was not written ({path.parent})")
    return json.loads(path.read_text())


def finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


# ---------------------------------------------------------------------------------------------- environment


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def _nvidia_smi(query: str) -> list[str]:
    try:
        done = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"], capture_output=True,
                              text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line.strip() for line in done.stdout.splitlines() if line.strip()] if done.returncode == 0 else []


def step_environment(plan: Plan, problems: list[str]) -> dict:
    from ddpm_lightning.precision import cpu_has_fast_bf16, resolve_precision

    env: dict[str, Any] = {
        "device": str(plan.device), "torch": torch.__version__, "python": platform.python_version(),
        "platform": platform.platform(), "cpu": _cpu_model(), "cpu_count": os.cpu_count(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(), "cpu_fast_bf16": cpu_has_fast_bf16(),
        "ram_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "load_average": [round(v, 2) for v in os.getloadavg()],
        "cuda_build": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "precision_auto": resolve_precision("auto", "gpu" if plan.cuda else "cpu"),
        "commit": _git("rev-parse", "HEAD"), "dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
    }
    env["nccl"] = None
    if torch.cuda.is_available():
        try:
            version = torch.cuda.nccl.version()
            env["nccl"] = ".".join(str(v) for v in version) if isinstance(version, tuple) else str(version)
        except Exception as error:  # noqa: BLE001 - a torch built without NCCL
            problems.append(f"NCCL version unavailable: {_first_line(error)}")
    gpus = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        gpus.append({"name": props.name, "memory_gib": round(props.total_memory / 2**30, 1),
                     "capability": f"{props.major}.{props.minor}", "multiprocessors": props.multi_processor_count})
    env["gpus"], env["gpu_count"] = gpus, len(gpus)
    drivers = _nvidia_smi("driver_version")
    env["driver"] = drivers[0] if drivers else None
    if plan.cuda:
        major, _ = torch.cuda.get_device_capability(plan.device)
        env["bf16_supported"] = torch.cuda.is_bf16_supported()
        env["tf32_supported"] = major >= 8
        env["name"] = torch.cuda.get_device_name(plan.device)
        driver_api = getattr(torch._C, "_cuda_getDriverVersion", None)
        if env["driver"] is None and driver_api is not None:
            env["driver"] = f"CUDA driver API {driver_api()} (nvidia-smi not found)"
    else:
        env["bf16_supported"] = env["cpu_fast_bf16"]
        env["tf32_supported"] = False
        env["name"] = env["cpu"]
    return env


# ----------------------------------------------------------------------------------------------- throughput


class _Fp32Matmuls:
    """fp32 rows on a GPU run their matmuls and convolutions in TF32 (``torch.set_float32_matmul_precision``)."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda

    def __enter__(self) -> None:
        if self.cuda:
            self.saved = (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32)
            torch.set_float32_matmul_precision("high")
            torch.backends.cudnn.allow_tf32 = True

    def __exit__(self, *exc: object) -> None:
        if self.cuda:
            torch.set_float32_matmul_precision(self.saved[0])
            torch.backends.cudnn.allow_tf32 = self.saved[1]


def precision_label(precision: str, cuda: bool) -> str:
    return "32-true (TF32)" if precision == "32-true" and cuda else precision


def matmul_rates(plan: Plan) -> dict[str, float]:
    """This device's matmul rate in TFLOP/s: bf16, and fp32 as the fp32 rows run it (TF32 on a GPU)."""
    n = 256 if plan.quick else (8192 if plan.cuda else 2048)
    repeats = 3 if plan.quick else 20
    rates = {"bf16": common.matmul_gflops(n, torch.bfloat16, plan.device, repeats) / 1e3}
    with _Fp32Matmuls(plan.cuda):
        rates["fp32"] = common.matmul_gflops(n, torch.float32, plan.device, repeats) / 1e3
    rates["n"] = n
    return rates


def _train_step(model: torch.nn.Module, compiled: torch.nn.Module, inputs: dict, precision: str,
                device: torch.device, calls: int) -> Callable[[], None]:
    step = common.train_step_fn(compiled, inputs, common.adamw(model))
    if precision == "bf16-mixed":
        step = common.autocast_bf16(step, device.type)

    def repeated() -> None:
        for _ in range(calls):
            step()

    return common.synchronized(repeated, device)


def _flops(plan: Plan, config: common.ArchConfig, name: str, model: torch.nn.Module, inputs: dict) -> int:
    """FLOPs of one fp32 eager train step (the same for every precision and for the compiled step)."""
    key = (config.name, name)
    if key not in plan.flops:
        plan.flops[key] = common.count_flops(common.train_step_fn(model, inputs, common.adamw(model)))
    return plan.flops[key]


def measure_group(plan: Plan, config: common.ArchConfig, precision: str, compile_mode: bool, rates: dict,
                  problems: list[str], names: tuple[str, ...] = unet.CONTENDERS) -> list[dict]:
    """One table block: the contenders at one config and precision, timed in the same interleaved rounds."""
    label = f"{config.name} {precision_label(precision, plan.cuda)}{' compiled' if compile_mode else ''}"
    inputs = common.make_inputs(config, device=plan.device)
    models: dict[str, torch.nn.Module] = {}
    steps: dict[str, Callable[[], None]] = {}
    compile_s: dict[str, float] = {}
    with _Fp32Matmuls(plan.cuda and precision == "32-true"):
        for name in names:
            try:
                model = unet.build_contender(name, config, like=models.get("ours")).to(plan.device).train()
                _flops(plan, config, name, model, inputs)
                compiled = torch.compile(model, backend=plan.compile_backend) if compile_mode else model
                step = _train_step(model, compiled, inputs, precision, plan.device, plan.calls_per_round)
                if compile_mode:  # compiled (forward and backward graphs) and warmed up outside the rounds
                    start = time.perf_counter()
                    step()
                    compile_s[name] = time.perf_counter() - start
                models[name], steps[name] = model, step
            except Exception as error:  # noqa: BLE001 - one contender's failure is one line; the others run
                problems.append(f"{label} {name}: {type(error).__name__}: {_first_line(error)}")
        if not steps:
            return []
        times = common.interleaved(steps, plan.rounds, warmup=1 if plan.quick else 2)
        rows = []
        for name, step in steps.items():
            seconds = common.median(times[name]) / plan.calls_per_round
            n = config.batch_size
            flops = plan.flops[(config.name, name)]
            row = {"config": config.name, "model": name, "precision": precision_label(precision, plan.cuda),
                   "mode": f"compile ({plan.compile_backend})" if compile_mode else "eager", "batch": n,
                   "params_m": common.num_parameters(models[name]) / 1e6, "train_img_s": n / seconds,
                   "step_ms": 1e3 * seconds, "gflop_per_img": flops / n / 1e9,
                   "achieved_tflops": flops / seconds / 1e12,
                   "pct_bf16_matmul": 100 * flops / seconds / 1e12 / rates["bf16"],
                   "peak_mib": common.peak_memory_mb(step, plan.device)}  # of one call: steps free their memory
            if compile_mode:
                row["compile_s"] = compile_s[name]
            rows.append(row)
    ours = next((r for r in rows if r["model"] == "ours"), None)
    for row in rows:
        row["ours_over_this"] = ours["train_img_s"] / row["train_img_s"] if ours else None
    models.clear()
    steps.clear()
    if plan.cuda:
        torch.cuda.empty_cache()
    return rows


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return (lines[0] if lines else type(error).__name__)[:300]


def _throughput_setup(plan: Plan) -> dict:
    if plan.cuda:
        torch.backends.cudnn.benchmark = True  # as trainer=gpu runs
    if not plan.rates:
        plan.rates = matmul_rates(plan)
    return {"matmul_tflops": plan.rates, "rounds": plan.rounds, "calls_per_round": plan.calls_per_round, "rows": []}


def step_throughput(plan: Plan, problems: list[str]) -> dict:
    data = _throughput_setup(plan)
    for config in plan.configs:
        for precision in PRECISIONS:
            data["rows"] += measure_group(plan, config, precision, False, data["matmul_tflops"], problems)
    _check_rows(data["rows"], problems)
    return data


def step_throughput_compile(plan: Plan, problems: list[str]) -> dict:
    """Compiled steps, most important first (bf16 before fp32), each group started only if it fits the budget."""
    data = _throughput_setup(plan)
    data["backend"], data["skipped"] = plan.compile_backend, []
    last_group_s = 0.0
    for config, precision in plan.compile_groups:
        left = plan.remaining_s()
        if left < max(30.0, 1.3 * last_group_s):
            data["skipped"].append(f"{config.name} {precision_label(precision, plan.cuda)}: {left:.0f} s left "
                                   f"of the {plan.budget_s:.0f} s budget")
            continue
        start = time.perf_counter()
        torch._dynamo.reset()  # fresh caches per block: no block runs into dynamo's recompile limit (and eager)
        data["rows"] += measure_group(plan, config, precision, True, data["matmul_tflops"], problems,
                                      plan.compile_contenders)
        last_group_s = time.perf_counter() - start
    _check_rows(data["rows"], problems)
    return data


def _check_rows(rows: list[dict], problems: list[str]) -> None:
    for row in rows:
        bad = [k for k in ("train_img_s", "achieved_tflops", "peak_mib") if not finite(row[k]) or row[k] <= 0]
        if bad:
            problems.append(f"{row['config']} {row['model']} {row['precision']} {row['mode']}: "
                            f"not a positive number: {', '.join(bad)}")


# ----------------------------------------------------------------------------------------------------- train


def read_csv_metric(run_dir: Path, key: str) -> list[dict]:
    """Every logged value of ``key`` in the run's CSV logs, as [{logged_step, value}] in step order (the CSV
    logger's ``step`` column: Lightning logs a validation after optimizer step k as step k - 1)."""
    values = {}
    for path in sorted(run_dir.glob("csv/version_*/metrics.csv")):
        with open(path, newline="") as handle:
            for row in csv.DictReader(handle):
                if row.get(key):
                    values[int(row["step"])] = float(row[key])
    return [{"logged_step": step, "value": value} for step, value in sorted(values.items())]


def step_train(plan: Plan, problems: list[str]) -> dict:
    run = plan.work / "train"
    timer = run / "step_timer.json"
    overrides = [
        "experiment=default", "trainer=gpu" if plan.cuda else "trainer=cpu", f"trainer.max_steps={plan.train_steps}",
        "trainer.max_time=null", f"trainer.val_check_interval={plan.val_every}",
        "callbacks.generative_metrics.every_n_val_epochs=1",
        f"callbacks.generative_metrics.in_loop_num_samples={plan.in_loop_samples}",
        f"callbacks.generative_metrics.num_samples={plan.final_samples}",
        *plan.run_overrides(), *(QUICK_SCORING if plan.quick else []),
        "allow_any_target=true", "+callbacks.step_timer._target_=benchmarks.step_timer.StepTimer",
        f"+callbacks.step_timer.path={timer}",
    ]
    argv = [*train_cli(), *overrides, f"hydra.run.dir={run}"]
    start = time.perf_counter()
    run_command(plan, argv, plan.work / "logs" / "train.log", 600 if plan.quick else 420)
    wall = time.perf_counter() - start
    summary, timing = read_json(run / "summary.json"), read_json(timer)
    in_loop_key, final_key = f"val/fid@{plan.in_loop_samples}", f"val/fid@{plan.final_samples}"
    final = summary.get("metrics", {}).get(final_key)
    data = {"command": "ddpm-train " + " ".join(overrides), "global_step": summary.get("global_step"),
            "steps_per_s": timing["steps_per_s"], "loop_steps_per_s": timing["loop_steps_per_s"],
            "first_step_s": timing["first_step_s"], "fit_seconds": summary.get("train_seconds"),
            "wall_seconds": wall, "img_per_s": None, "in_loop_key": in_loop_key,
            "in_loop": read_csv_metric(run, in_loop_key), "final_key": final_key, "final_fid": final,
            "val_vlb_bpd": summary.get("metrics", {}).get("val/vlb_bpd"),
            "num_parameters": summary.get("num_parameters")}
    composed = OmegaConf.load(run / ".hydra" / "config.yaml")
    data["batch_size"], data["precision"] = int(composed.data.batch_size), str(composed.trainer.precision)
    if finite(timing["steps_per_s"]):
        data["img_per_s"] = timing["steps_per_s"] * data["batch_size"]
    if summary.get("global_step") != plan.train_steps:
        problems.append(f"trained {summary.get('global_step')} steps, not {plan.train_steps}")
    if not finite(final):
        problems.append(f"no finite {final_key} at the end of training (got {final})")
    scores = plan.train_steps // plan.val_every
    if len(data["in_loop"]) != scores or not all(finite(r["value"]) for r in data["in_loop"]):
        problems.append(f"expected {scores} finite in-loop {in_loop_key} scores, got {data['in_loop']}")
    if not finite(timing["steps_per_s"]) or timing["steps_per_s"] <= 0:
        problems.append(f"no training speed measured ({timing})")
    checkpoint = run / "checkpoints" / "last.ckpt"
    if checkpoint.is_file():
        plan.checkpoints.insert(0, checkpoint)
    else:
        problems.append(f"no checkpoint {checkpoint}")
    return data


# ------------------------------------------------------------------------------------------------ ddp resume


def compare_checkpoints(path_a: Path, path_b: Path) -> dict:
    """Every tensor of two checkpoints' training state (weights and EMA, AdamW moments): equal bit for bit, or
    the largest absolute difference."""
    a, b = (torch.load(p, map_location="cpu", weights_only=True) for p in (path_a, path_b))
    pairs = [(f"state_dict.{k}", v, b["state_dict"].get(k)) for k, v in a["state_dict"].items()]
    for index, moments in a["optimizer_states"][0]["state"].items():
        other = b["optimizer_states"][0]["state"].get(index, {})
        pairs += [(f"optimizer.{index}.{name}", value, other.get(name)) for name, value in moments.items()]
    differ, max_abs = [], 0.0
    for key, x, y in pairs:
        if y is None or x.shape != y.shape:
            differ.append(key)
            max_abs = math.inf
            continue
        if not torch.equal(x, y):
            differ.append(key)
            if x.is_floating_point():
                max_abs = max(max_abs, float((x.double() - y.double()).abs().max()))
    return {"global_steps": [a["global_step"], b["global_step"]], "tensors": len(pairs), "differing": len(differ),
            "differing_examples": differ[:3], "bit_exact": not differ, "max_abs_diff": max_abs}


def step_ddp_resume(plan: Plan, problems: list[str]) -> dict:
    accelerator = "gpu" if plan.cuda else "cpu"
    base = ["experiment=default", "trainer=ddp", f"trainer.accelerator={accelerator}",
            f"trainer.devices={plan.ddp_devices}", "trainer.max_time=null", "optim.lr_schedule=constant",
            "callbacks.generative_metrics=null", "callbacks.sample_grid.every_n_steps=0",
            "callbacks.sample_grid.on_train_end=false", "trainer.val_check_interval=2", "trainer.limit_val_batches=1",
            "trainer.deterministic=warn", "trainer.benchmark=false", "seed=1", *plan.run_overrides()]
    whole, cut = plan.work / "ddp" / "whole", plan.work / "ddp" / "cut"
    timeout = 600 if plan.quick else 300
    logs = plan.work / "logs"
    texts = [run_command(plan, [*train_cli(), *base, "trainer.max_steps=4", f"hydra.run.dir={whole}"],
                         logs / "ddp_whole.log", timeout),
             run_command(plan, [*train_cli(), *base, "trainer.max_steps=2", f"hydra.run.dir={cut}"],
                         logs / "ddp_cut.log", timeout),
             run_command(plan, [*train_cli(), *base, "trainer.max_steps=4", "resume=auto", f"hydra.run.dir={cut}"],
                         logs / "ddp_resumed.log", timeout)]
    backends = sorted(set(re.findall(r"distributed_backend=(\w+)", "\n".join(texts))))
    ops = sorted(set(NONDETERMINISTIC.findall("\n".join(texts))))
    comparison = compare_checkpoints(whole / "checkpoints" / "last.ckpt", cut / "checkpoints" / "last.ckpt")
    data = {"command": "ddpm-train " + " ".join(base) + " trainer.max_steps=4 (whole) | trainer.max_steps=2, then "
                       "trainer.max_steps=4 resume=auto (cut)",
            "backend": backends[0] if len(backends) == 1 else backends, "devices": plan.ddp_devices,
            "resumed": "resuming from" in texts[2],
            "determinism": {"trainer.deterministic": "warn (torch.use_deterministic_algorithms(True, warn_only=True))",
                            "trainer.benchmark": False, "CUBLAS_WORKSPACE_CONFIG": ":4096:8 (set by Lightning)",
                            "cudnn.allow_tf32": torch.backends.cudnn.allow_tf32,
                            "float32_matmul_precision": torch.get_float32_matmul_precision()},
            "nondeterministic_ops": ops, **comparison}
    expected_backend = "nccl" if plan.cuda else "gloo"
    if data["backend"] != expected_backend:
        problems.append(f"process group backend {data['backend']}, expected {expected_backend}")
    if not data["resumed"]:
        problems.append("the second run did not resume from the first one's checkpoint")
    if comparison["global_steps"] != [4, 4]:
        problems.append(f"global steps {comparison['global_steps']}, expected [4, 4]")
    if not comparison["bit_exact"] and not ops:
        problems.append(f"resumed run differs from the uninterrupted one ({comparison['differing']} of "
                        f"{comparison['tensors']} tensors, max |diff| {comparison['max_abs_diff']:.3g}) although no "
                        f"op without a deterministic kernel was reported")
    if plan.ddp_devices == 1 or not plan.checkpoints:
        plan.checkpoints.append(whole / "checkpoints" / "last.ckpt")
    return data


# ------------------------------------------------------------------------------------------------------ eval


def feature_tolerance(plan: Plan) -> tuple[float, str]:
    """How close the device's features must be to the CPU's (relative to the largest feature)."""
    if not plan.cuda:
        return 1e-5, "same device: float32 round-off only"
    if torch.backends.cudnn.allow_tf32:
        return 1e-2, "CUDA convolutions in TF32 (torch's default cudnn.allow_tf32=True): ~1e-3 per layer"
    return 1e-4, "CUDA float32 kernels vs CPU kernels: summation order"


def step_eval(plan: Plan, problems: list[str]) -> dict:
    ckpt = next((p for p in plan.checkpoints if p.is_file()), None)
    if ckpt is None:
        raise CheckError("no checkpoint to evaluate: the train and ddp_resume steps wrote none")
    run = plan.work / "eval"
    n, batch = plan.eval_samples, (8 if plan.quick else 500)
    overrides = [f"ckpt={ckpt}", f"num_samples={n}", f"device={plan.device.type}", "metrics=[fid]",
                 f"feature={plan.feature}", f"reference_n={plan.reference_n}", f"batch_size={batch}",
                 f"shard_size={batch}", f"cache_dir={plan.cache_dir}", *(["steps=2"] if plan.quick else [])]
    start = time.perf_counter()
    run_command(plan, [sys.executable, "-m", "ddpm_lightning.cli.evaluate", *overrides, f"hydra.run.dir={run}"],
                plan.work / "logs" / "eval.log", 600 if plan.quick else 420)
    wall = time.perf_counter() - start
    results = read_json(run / "results.json")
    fid_key = f"fid@{n}"
    data = {"command": "ddpm-eval " + " ".join(overrides), "checkpoint": str(ckpt), "num_samples": n,
            "samples_per_s": results.get("samples_per_second"), "wall_seconds": wall, "fid_key": fid_key,
            "fid_device": results.get("metrics", {}).get(fid_key), "feature": plan.feature}
    data.update(cpu_features(plan, ckpt, run, batch))
    if not finite(data["samples_per_s"]) or data["samples_per_s"] <= 0:
        problems.append(f"no sampling speed in results.json ({data['samples_per_s']})")
    if not finite(data["fid_device"]):
        problems.append(f"no finite {fid_key} from ddpm-eval (got {data['fid_device']})")
    if data["samples_compared"] != n:
        problems.append(f"{data['samples_compared']} samples found in the shards, expected {n}")
    if not data["features_agree"]:
        problems.append(f"device and CPU features differ by {data['feature_max_rel_diff']:.3g} of the largest "
                        f"feature (tolerance {data['feature_tolerance']:.0e}: {data['feature_tolerance_why']})")
    return data


def cpu_features(plan: Plan, ckpt: Path, run: Path, batch: int) -> dict:
    """The samples ddpm-eval wrote, featurised again on the CPU by the same scorer; compared with the features
    the device stored beside them, and scored against the same (cached) reference statistics."""
    from hydra.utils import instantiate

    from ddpm_lightning.cli.shards import SHARD_NAME, read_shard
    from ddpm_lightning.metrics import make_generative_metrics

    run_config = torch.load(ckpt, map_location="cpu", weights_only=True).get("run_config") or {}
    if not run_config.get("data"):
        raise CheckError(f"{ckpt} stores no data config: cannot find the reference statistics")
    datamodule = instantiate(run_config["data"])
    scorer = make_generative_metrics(datamodule, metrics=["fid"], feature=plan.feature,
                                     reference_n=plan.reference_n, cache_dir=str(plan.cache_dir), batch_size=batch,
                                     device="cpu", log=lambda message: None)
    shards = sorted(p for p in (run / "shards").glob("*.npz") if SHARD_NAME.match(p.name))
    start = time.perf_counter()
    cpu_parts, device_parts, max_abs, scale = [], [], 0.0, 0.0
    for shard in shards:
        arrays = read_shard(shard)
        images = torch.from_numpy(arrays["arr_0"]).permute(0, 3, 1, 2).contiguous()
        stored = torch.from_numpy(arrays["f_pool"]).float()
        ours = torch.cat([scorer.outputs(images[i:i + batch])["pool"] for i in range(0, len(images), batch)])
        max_abs = max(max_abs, float((ours - stored).abs().max()))
        scale = max(scale, float(ours.abs().max()))
        cpu_parts.append({"pool": ours})
        device_parts.append({"pool": stored})
    seconds = time.perf_counter() - start
    compared = sum(len(p["pool"]) for p in cpu_parts)
    if compared < 2:
        raise CheckError(f"ddpm-eval left {compared} samples in {run / 'shards'}")
    tolerance, why = feature_tolerance(plan)
    rel = max_abs / scale if scale > 0 else math.inf
    fid_cpu, fid_stored = scorer.score(cpu_parts)["fid"], scorer.score(device_parts)["fid"]
    return {"samples_compared": compared, "cpu_feature_seconds": seconds, "feature_max_abs_diff": max_abs,
            "feature_max_rel_diff": rel, "feature_tolerance": tolerance, "feature_tolerance_why": why,
            "features_agree": rel <= tolerance, "fid_cpu_features": fid_cpu, "fid_device_features": fid_stored,
            "fid_rel_diff": abs(fid_cpu - fid_stored) / max(abs(fid_stored), 1e-12)}


# ---------------------------------------------------------------------------------------------------- report

STEP_FUNCTIONS: dict[str, Callable[[Plan, list[str]], dict]] = {
    "environment": step_environment, "throughput": step_throughput, "train": step_train,
    "ddp_resume": step_ddp_resume, "eval": step_eval, "throughput_compile": step_throughput_compile,
}


class Report:
    def __init__(self, plan: Plan, argv: list[str]) -> None:
        self.plan = plan
        self.data: dict[str, Any] = {
            "schema": SCHEMA, "command": "python -m benchmarks.gpu_check " + " ".join(argv),
            "started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "finished": None,
            "seconds": None, "device": str(plan.device), "device_name": None, "quick": plan.quick,
            "budget_s": plan.budget_s, "steps_requested": list(plan.steps), "ok": None, "failures": [],
            "skipped": [], "steps": {},
        }

    def record(self, name: str, status: str, seconds: float, data: dict, errors: list[str]) -> None:
        self.data["steps"][name] = {"status": status, "seconds": round(seconds, 2), "errors": errors, **data}
        self.data["failures"] += [f"failed: {name}: {error}" for error in errors]
        self.data["skipped"] += [f"skipped: {name}: {line}" for line in data.get("skipped", [])]
        if name == "environment" and status == "ok":
            self.data["device_name"] = data.get("name")

    def finish(self) -> None:
        self.data["finished"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        self.data["seconds"] = round(time.monotonic() - self.plan.started, 1)
        self.data["ok"] = not self.data["failures"]

    def write(self) -> None:
        self.plan.out.mkdir(parents=True, exist_ok=True)
        (self.plan.out / "report.json").write_text(json.dumps(self.data, indent=2, default=str) + "\n")
        (self.plan.out / "report.md").write_text(render_markdown(self.data))


def run_step(plan: Plan, report: Report, name: str) -> None:
    print(f"[gpu-check] {name} ...", flush=True)
    problems: list[str] = []
    start = time.perf_counter()
    try:
        data = STEP_FUNCTIONS[name](plan, problems)
    except CheckError as error:
        data, problems = {}, [*problems, str(error)]
    except Exception as error:  # noqa: BLE001 - any failure is one line in the report; the check goes on
        data, problems = {}, [*problems, f"{type(error).__name__}: {_first_line(error)}"]
    seconds = time.perf_counter() - start
    report.record(name, "failed" if problems else "ok", seconds, data, problems)
    report.write()
    status = "ok" if not problems else "FAILED: " + "; ".join(problems)
    print(f"[gpu-check] {name}: {status} ({seconds:.0f} s)", flush=True)


def _fmt(value: Any, digits: int = 3) -> str:
    if isinstance(value, float):
        if not math.isfinite(value) or value == 0:
            return str(value)
        return f"{value:.{max(0, digits - 1 - int(math.floor(math.log10(abs(value)))))}f}"
    return "-" if value is None else str(value)


def _rows_table(rows: list[dict]) -> str:
    columns = ["config", "model", "precision", "mode", "batch", "params_m", "train_img_s", "ours_over_this",
               "step_ms", "peak_mib", "gflop_per_img", "achieved_tflops", "pct_bf16_matmul", "compile_s"]
    columns = [c for c in columns if any(c in r for r in rows)]
    return common.table([{c: r.get(c, "") for c in columns} for r in rows], columns)


def render_markdown(report: dict) -> str:
    """report.json as a page: one section per step, failures first."""
    steps = report["steps"]
    lines = [f"# GPU check: {report.get('device_name') or report['device']}", "",
             f"`{report['command']}`, {report['started']}, {_fmt(report['seconds'])} s"
             f"{' (quick: tiny sizes, numbers meaningless)' if report['quick'] else ''}.", ""]
    status = "all steps passed" if report["ok"] else f"{len(report['failures'])} failure(s)"
    lines += [f"**{status}**" if report["ok"] is not None else "**running**", ""]
    lines += [f"- {line}" for line in report["failures"] + report["skipped"]]
    lines += [""]
    env = steps.get("environment")
    if env and env["status"] == "ok":
        gpus = ", ".join(f"{g['name']} ({g['memory_gib']} GiB, sm {g['capability']})" for g in env["gpus"]) or "none"
        lines += ["## Environment", "", "| | |", "|---|---|",
                  f"| GPUs | {env['gpu_count']}: {gpus} |", f"| driver | {_fmt(env['driver'])} |",
                  f"| CUDA (torch build) / cuDNN / NCCL | {_fmt(env['cuda_build'])} / {_fmt(env['cudnn'])} / "
                  f"{_fmt(env['nccl'])} |",
                  f"| torch / Python | {env['torch']} / {env['python']} |",
                  f"| bf16 / TF32 | {env['bf16_supported']} / {env['tf32_supported']} "
                  f"(precision=auto -> {env['precision_auto']}) |",
                  f"| CPU | {env['cpu']}, {env['cpu_count']} cores, {env['ram_gib']} GiB, {env['cpu_capability']}, "
                  f"load {env['load_average']} |",
                  f"| code | {env['commit']}{' (uncommitted changes)' if env['dirty'] else ''} |", ""]
    for name, title in (("throughput", "Train throughput (eager)"), ("throughput_compile", "Train throughput "
                                                                                            "(torch.compile)")):
        step = steps.get(name)
        if step and step.get("rows"):
            rates = step["matmul_tflops"]
            lines += [f"## {title}", "", _rows_table(step["rows"]), "",
                      f"Matmul rate of this device ({rates['n']}^2 `torch.mm`): bf16 {_fmt(rates['bf16'])} TFLOP/s, "
                      f"fp32{' (TF32)' if report['device'].startswith('cuda') else ''} {_fmt(rates['fp32'])} "
                      f"TFLOP/s. `ours_over_this` = ours img/s / this row's img/s in the same block. Medians of "
                      f"{step['rounds']} interleaved rounds of {step['calls_per_round']} step(s).", ""]
    train = steps.get("train")
    if train and train.get("command"):
        scores = ", ".join(f"{r['logged_step']}: {_fmt(r['value'])}" for r in train["in_loop"]) or "none"
        lines += ["## End-to-end training", "", f"`{train['command']}`", "",
                  f"- {train['global_step']} steps; {_fmt(train['steps_per_s'])} steps/s in the training batches "
                  f"({_fmt(train['img_per_s'])} img/s), {_fmt(train['loop_steps_per_s'])} steps/s over the whole loop "
                  f"(validation and in-loop scoring included); fit {_fmt(train['fit_seconds'])} s",
                  f"- in-loop `{train['in_loop_key']}` by logged step: {scores}",
                  f"- `{train['final_key']}` at the end: {_fmt(train['final_fid'])}", ""]
    ddp = steps.get("ddp_resume")
    if ddp and ddp.get("command"):
        verdict = "bit-exact" if ddp["bit_exact"] else (
            f"{ddp['differing']} of {ddp['tensors']} tensors differ, max |diff| {_fmt(ddp['max_abs_diff'])}")
        lines += ["## DDP stop and resume", "", f"`{ddp['command']}`", "",
                  f"- backend {ddp['backend']}, {ddp['devices']} process(es); resumed: {ddp['resumed']}",
                  f"- 2 + 2 steps vs 4 steps ({ddp['tensors']} tensors: weights, EMA, AdamW moments): **{verdict}**",
                  f"- ops without a deterministic kernel: {', '.join(ddp['nondeterministic_ops']) or 'none reported'}",
                  f"- determinism settings: {json.dumps(ddp['determinism'])}", ""]
    ev = steps.get("eval")
    if ev and ev.get("command"):
        lines += ["## Evaluation", "", f"`{ev['command']}`", "",
                  f"- {ev['num_samples']} samples at {_fmt(ev['samples_per_s'])} samples/s; `{ev['fid_key']}` "
                  f"{_fmt(ev['fid_device'])} (feature {ev['feature']})",
                  f"- the same samples' features on the CPU: max |diff| {_fmt(ev['feature_max_abs_diff'])} "
                  f"({_fmt(ev['feature_max_rel_diff'])} of the largest feature; tolerance "
                  f"{ev['feature_tolerance']:.0e}, {ev['feature_tolerance_why']}): "
                  f"{'agree' if ev['features_agree'] else '**disagree**'}",
                  f"- FID from CPU features {_fmt(ev['fid_cpu_features'])}, from the device's "
                  f"{_fmt(ev['fid_device_features'])} (relative difference {_fmt(ev['fid_rel_diff'])})", ""]
    lines += ["Step times: " + ", ".join(f"{k} {_fmt(v['seconds'])} s ({v['status']})" for k, v in steps.items()), ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------ main


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9.]+", "-", text.lower()).strip("-")


def default_out(device: torch.device, quick: bool) -> Path:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return ROOT / "results" / "gpu" / f"{dt.date.today().isoformat()}-{_slug(name)}{'-quick' if quick else ''}"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(parser)  # --quick (every step tiny), --threads (also the CLIs'), --rounds
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="where to run (default: cuda)")
    parser.add_argument("--out", type=Path, default=None,
                        help="report folder (default: results/gpu/<date>-<device>[-quick])")
    parser.add_argument("--work", type=Path, default=None,
                        help="folder for the runs (default: a temporary folder, removed at the end)")
    parser.add_argument("--keep-work", action="store_true", help="keep the runs' folder (checkpoints, samples, logs)")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="reference statistics cache (default: $DDPM_CACHE_DIR or ~/.cache/ddpm_lightning)")
    parser.add_argument("--only", default=",".join(STEPS), help=f"comma-separated steps (default: all of {STEPS})")
    parser.add_argument("--budget-min", type=float, default=None,
                        help="wall-clock budget; torch.compile blocks that would not fit are skipped (default: 8; "
                             "quick: 30)")
    parser.add_argument("--train-steps", type=int, default=None, help="steps of the train step (default: 400; quick 4)")
    parser.add_argument("--eval-samples", type=int, default=None, help="ddpm-eval samples (default: 2000; quick 8)")
    parser.add_argument("--ddp-devices", type=int, default=1, help="processes of the ddp_resume step (default: 1)")
    parser.add_argument("--compile-backend", default=None,
                        help="torch.compile backend (default: inductor; quick: aot_eager)")
    return parser.parse_args(argv)


def make_plan(args: argparse.Namespace) -> Plan:
    """The plan, or ValueError naming the bad option."""
    steps = tuple(s.strip() for s in args.only.split(",") if s.strip())
    unknown = [s for s in steps if s not in STEPS]
    if unknown or not steps:
        raise ValueError(f"--only {args.only!r}: unknown step(s) {', '.join(unknown) or '(none given)'}; "
                         f"allowed: {', '.join(STEPS)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device cuda but torch sees no GPU (torch {torch.__version__}, CUDA build "
                         f"{torch.version.cuda or 'none'}): run `make gpu-check ARGS=\"--device cpu --quick\"` for "
                         f"the CPU run of every step")
    train_steps = args.train_steps if args.train_steps is not None else (4 if args.quick else 400)
    eval_samples = args.eval_samples if args.eval_samples is not None else (8 if args.quick else 2000)
    if train_steps < 2:
        raise ValueError(f"--train-steps must be >= 2 (one in-loop score at half), got {train_steps}")
    if eval_samples < 2:
        raise ValueError(f"--eval-samples must be >= 2 for an FID, got {eval_samples}")
    if args.ddp_devices < 1 or (args.device == "cuda" and args.ddp_devices > torch.cuda.device_count()):
        raise ValueError(f"--ddp-devices must be between 1 and the number of devices, got {args.ddp_devices}")
    budget_min = args.budget_min if args.budget_min is not None else (30.0 if args.quick else 8.0)
    if budget_min <= 0:
        raise ValueError(f"--budget-min must be > 0, got {budget_min}")
    if args.threads is not None and args.threads < 1 or args.rounds is not None and args.rounds < 1:
        raise ValueError(f"--threads and --rounds must be >= 1, got {args.threads} and {args.rounds}")
    if args.work is not None and args.work.exists() and (not args.work.is_dir() or any(args.work.iterdir())):
        raise ValueError(f"--work {args.work} is not an empty folder: give a new one (the runs would find the "
                         f"files of earlier runs there)")
    device = torch.device(args.device)
    work = args.work or Path(tempfile.mkdtemp(prefix="gpu_check-"))
    cache = args.cache_dir or Path(os.environ.get("DDPM_CACHE_DIR") or Path.home() / ".cache" / "ddpm_lightning")
    return Plan(device=device, quick=args.quick, out=(args.out or default_out(device, args.quick)).resolve(),
                work=work.resolve(), cache_dir=cache.expanduser().resolve(), budget_s=60 * budget_min,
                steps=steps, compile_backend=args.compile_backend or ("aot_eager" if args.quick else "inductor"),
                train_steps=train_steps, eval_samples=eval_samples, ddp_devices=args.ddp_devices,
                threads=args.threads, rounds_arg=args.rounds)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    plan = None
    try:
        plan = make_plan(args)
        plan.out.mkdir(parents=True, exist_ok=True)
        plan.work.mkdir(parents=True, exist_ok=True)
    except (ValueError, OSError) as error:
        if plan is not None and args.work is None:
            shutil.rmtree(plan.work, ignore_errors=True)
        message = error if isinstance(error, ValueError) else (
            f"cannot create {error.filename}: {error.strerror}; choose another --out / --work")
        print(f"error: {message}", file=sys.stderr)
        return 2
    common.set_threads(plan.threads)
    report = Report(plan, argv)
    print(f"[gpu-check] {plan.device}{' (quick)' if plan.quick else ''}: report in {plan.out}, runs in {plan.work}",
          flush=True)
    try:
        for name in STEPS:
            if name in plan.steps:
                run_step(plan, report, name)
    finally:
        report.finish()
        report.write()
        if args.work is None and not args.keep_work:
            shutil.rmtree(plan.work, ignore_errors=True)
    for line in report.data["failures"]:
        print(line, file=sys.stderr)
    print(f"[gpu-check] {'ok' if report.data['ok'] else 'FAILED'}: {plan.out / 'report.md'}", flush=True)
    return 0 if report.data["ok"] else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
