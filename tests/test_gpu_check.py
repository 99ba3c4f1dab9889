"""The GPU check (``make gpu-check``) kept alive on the CPU: every step, tiny, through the make target.

``make gpu-check ARGS="--device cpu --quick"`` runs the real CLIs (``ddpm-train``, DDP with gloo, ``ddpm-eval``)
and the benchmark networks at tiny sizes; the report's structure and values are checked here, so a change that
breaks a step on the GPU path (a renamed key, a moved file, a CLI that no longer accepts an override) fails
the suite instead of a scarce GPU session. ~1-3 minutes on 2 busy cores.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import gpu_check

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "benchmarks" / "README.md"


def _check(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=900)


@pytest.fixture(scope="module")
def quick(tmp_path_factory) -> tuple[dict, str]:
    """``make gpu-check ARGS="--device cpu --quick ..."`` (the stamp of ``make install`` taken as done)."""
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    root = tmp_path_factory.mktemp("gpu_check")
    args = f"--device cpu --quick --threads 1 --out {root / 'report'} --cache-dir {root / 'cache'}"
    done = subprocess.run(["make", "-o", ".venv/.installed", "gpu-check", f"PY={sys.executable}", f"ARGS={args}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    report = json.loads((root / "report" / "report.json").read_text())
    return report, (root / "report" / "report.md").read_text()


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_every_step_runs_and_passes(quick):
    report, markdown = quick
    assert report["ok"] is True and report["failures"] == [], report["failures"]
    assert list(report["steps"]) == list(gpu_check.STEPS)
    assert all(step["status"] == "ok" and step["errors"] == [] for step in report["steps"].values())
    assert report["device"] == "cpu" and report["quick"] is True and report["schema"] == gpu_check.SCHEMA
    assert _positive(report["seconds"]) and report["finished"] >= report["started"]
    assert "**all steps passed**" in markdown
    for title in ("## Environment", "## Train throughput (eager)", "## Train throughput (torch.compile)",
                  "## End-to-end training", "## DDP stop and resume", "## Evaluation"):
        assert title in markdown


def test_environment_names_the_machine(quick):
    env = quick[0]["steps"]["environment"]
    assert env["torch"] == torch.__version__ and env["cuda_build"] == torch.version.cuda
    assert env["gpu_count"] == torch.cuda.device_count() == len(env["gpus"])
    assert env["cpu_count"] >= 1 and env["ram_gib"] > 0 and env["name"]
    assert env["precision_auto"] in ("bf16-mixed", "32-true")
    assert re.fullmatch(r"[0-9a-f]{40}", env["commit"] or ""), env["commit"]


def test_throughput_compares_the_three_networks_in_both_precisions(quick):
    step = quick[0]["steps"]["throughput"]
    assert _positive(step["matmul_tflops"]["bf16"]) and _positive(step["matmul_tflops"]["fp32"])
    rows = step["rows"]
    assert {(r["config"], r["model"], r["precision"]) for r in rows} == {
        (c, m, p) for c in ("default-exp", "small-adm") for m in ("ours", "diffusers", "adm-ref")
        for p in ("bf16-mixed", "32-true")}
    for row in rows:
        for key in ("train_img_s", "step_ms", "peak_mib", "gflop_per_img", "achieved_tflops", "pct_bf16_matmul",
                    "ours_over_this", "params_m"):
            assert _positive(row[key]), (row["config"], row["model"], key, row[key])
        assert row["mode"] == "eager" and row["batch"] == 2
        if row["model"] == "ours":
            assert row["ours_over_this"] == 1.0
    # the peers are laid out as ours: the same parameter count in every block
    for config in ("default-exp", "small-adm"):
        assert len({r["params_m"] for r in rows if r["config"] == config}) == 1


def test_compiled_throughput_runs_within_the_budget(quick):
    step = quick[0]["steps"]["throughput_compile"]
    assert step["backend"] == "aot_eager" and step["skipped"] == []
    (row,) = step["rows"]
    assert (row["config"], row["model"], row["precision"]) == ("default-exp", "ours", "bf16-mixed")
    assert row["mode"] == "compile (aot_eager)" and _positive(row["compile_s"]) and _positive(row["train_img_s"])


def test_end_to_end_training_scores_in_the_loop_and_at_the_end(quick):
    train = quick[0]["steps"]["train"]
    assert train["command"].startswith("ddpm-train experiment=default trainer=cpu ")
    assert train["global_step"] == 4 and train["batch_size"] == 8 and train["precision"] == "auto"
    assert _positive(train["steps_per_s"]) and _positive(train["loop_steps_per_s"]) and _positive(train["img_per_s"])
    assert train["in_loop_key"] == "val/fid@6" and len(train["in_loop"]) == 2
    assert all(_positive(r["value"]) for r in train["in_loop"])
    assert train["final_key"] == "val/fid@8" and _positive(train["final_fid"])


def test_ddp_stop_and_resume_is_bit_exact_on_the_cpu(quick):
    ddp = quick[0]["steps"]["ddp_resume"]
    assert ddp["backend"] == "gloo" and ddp["devices"] == 1 and ddp["resumed"] is True
    assert ddp["global_steps"] == [4, 4] and ddp["tensors"] > 100
    assert ddp["bit_exact"] is True and ddp["differing"] == 0 and ddp["max_abs_diff"] == 0.0
    assert ddp["determinism"]["trainer.deterministic"].startswith("warn")


def test_eval_features_agree_between_the_device_and_the_cpu(quick):
    ev = quick[0]["steps"]["eval"]
    assert ev["num_samples"] == ev["samples_compared"] == 8 and ev["fid_key"] == "fid@8"
    assert _positive(ev["samples_per_s"]) and _positive(ev["fid_device"]) and _positive(ev["fid_cpu_features"])
    assert ev["features_agree"] is True and ev["feature_max_rel_diff"] <= ev["feature_tolerance"]
    # the FID ddpm-eval reported is the one its stored features give
    assert ev["fid_device_features"] == pytest.approx(ev["fid_device"], rel=1e-9)


def _keys(report: dict) -> set[str]:
    keys = {k for k in report if k != "steps"}
    for step in report["steps"].values():
        keys |= set(step)
        for name in ("rows", "in_loop", "gpus"):  # lists of objects
            for item in step.get(name, []):
                keys |= set(item)
        for name in ("matmul_tflops", "determinism"):  # objects
            keys |= set(step.get(name, {}))
    return keys


def test_every_report_key_is_documented(quick):
    """benchmarks/README.md, section "GPU check", names every key of report.json."""
    text = README.read_text()
    section = text[text.index("## GPU check"):]
    section = section[:section.find("\n## ", 1)] if "\n## " in section[1:] else section
    documented = set(re.findall(r"`([A-Za-z0-9_.@/-]+)`", section))
    missing = sorted(_keys(quick[0]) - documented)
    assert not missing, f"report.json keys not described in benchmarks/README.md (GPU check): {missing}"


# ------------------------------------------------------------------------------------------ failure handling
def test_a_failed_step_is_one_line_and_the_check_goes_on(tmp_path):
    """eval without a training step before it has no checkpoint: one line, the other steps still run."""
    done = _check("--device", "cpu", "--quick", "--only", "eval,environment", "--out", str(tmp_path / "r"))
    assert done.returncode == 1, done.stderr[-3000:]
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert report["ok"] is False and report["steps"]["environment"]["status"] == "ok"
    assert report["failures"] == ["failed: eval: no checkpoint to evaluate: the train and ddp_resume steps wrote "
                                  "none"]
    assert report["failures"][0] in done.stderr and "Traceback" not in done.stderr
    assert "- failed: eval: no checkpoint" in (tmp_path / "r" / "report.md").read_text()


def test_compiled_blocks_past_the_budget_are_skipped_not_failed(tmp_path):
    done = _check("--device", "cpu", "--quick", "--only", "throughput_compile", "--budget-min", "0.001",
                  "--out", str(tmp_path / "r"))
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    step = report["steps"]["throughput_compile"]
    assert step["status"] == "ok" and step["rows"] == [] and len(step["skipped"]) == 1
    assert report["skipped"][0].startswith("skipped: throughput_compile: default-exp bf16-mixed: ")


@pytest.mark.parametrize("args, message", [
    (["--device", "cpu", "--only", "train,nosuch"], "error: --only 'train,nosuch': unknown step(s) nosuch; allowed: "),
    (["--device", "cpu", "--eval-samples", "1"], "error: --eval-samples must be >= 2 for an FID, got 1"),
    (["--device", "cpu", "--budget-min", "0"], "error: --budget-min must be > 0, got 0.0"),
    (["--device", "cuda"], "error: --device cuda but torch sees no GPU"),
    (["--device", "cpu", "--work", "{used}"], "error: --work {used} is not an empty folder: give a new one"),
])
def test_bad_options_are_one_error_line(args, message, tmp_path, capsys):
    if args[1] == "cuda" and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    used = tmp_path / "used"
    (used / "train").mkdir(parents=True)
    args, message = [a.format(used=used) for a in args], message.format(used=used)
    assert gpu_check.main([*args, "--out", str(tmp_path / "r")]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), lines
    assert not (tmp_path / "r").exists()


def test_the_command_line_answers_bad_input_in_one_line(tmp_path):
    done = _check("--device", "cpu", "--only", "nosuch", "--out", str(tmp_path / "r"))
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip() == ("error: --only 'nosuch': unknown step(s) nosuch; allowed: environment, throughput, "
                                   "train, ddp_resume, eval, throughput_compile")


# ------------------------------------------------------------------------------------------ the pieces
def test_error_line_picks_the_cli_message():
    traceback = ("Traceback (most recent call last):\n  File \"x.py\", line 1\nImportError: cannot import name 'a'\n\n"
                 "Set the environment variable HYDRA_FULL_ERROR=1 for a complete stack trace.\n")
    assert gpu_check.error_line(traceback) == "ImportError: cannot import name 'a'"
    assert gpu_check.error_line("Epoch 0\nerror: trainer.max_steps must be > 0\n") == \
        "error: trainer.max_steps must be > 0"
    assert gpu_check.error_line("") == "no output"


def _checkpoint(path: Path, weight: torch.Tensor, moment: torch.Tensor, step: int = 4) -> Path:
    torch.save({"global_step": step, "state_dict": {"net.w": weight, "ema.w": weight.clone()},
                "optimizer_states": [{"state": {0: {"exp_avg": moment, "step": torch.tensor(4.0)}}}]}, path)
    return path


def test_checkpoint_comparison_reports_bit_equality_or_the_largest_difference(tmp_path):
    w, m = torch.randn(3, 3), torch.randn(3, 3)
    a = _checkpoint(tmp_path / "a.ckpt", w, m)
    same = gpu_check.compare_checkpoints(a, _checkpoint(tmp_path / "b.ckpt", w.clone(), m.clone()))
    assert same == {"global_steps": [4, 4], "tensors": 4, "differing": 0, "differing_examples": [],
                    "bit_exact": True, "max_abs_diff": 0.0}
    m2 = m.clone()
    m2[1, 2] += 0.25
    other = gpu_check.compare_checkpoints(a, _checkpoint(tmp_path / "c.ckpt", w.clone(), m2, step=3))
    assert other["bit_exact"] is False and other["differing"] == 1 and other["global_steps"] == [4, 3]
    assert other["differing_examples"] == ["optimizer.0.exp_avg"]
    assert other["max_abs_diff"] == pytest.approx(0.25, abs=1e-6)
