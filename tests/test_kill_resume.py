"""kill -9 at random points, then resume: the run ends exactly where an uninterrupted one does.

Slow (``make test-all``, or ``pytest -m slow tests/test_kill_resume.py``): every attempt is a fresh
``python -m ddpm_lightning.train``. ``DDPM_KILLS`` random kills (default 12; ``make test-all`` sets 50) land
during steps, validation, in-loop scoring, checkpoint writes and the final scoring of one run; chosen kills hit
each of those phases once; more random kills hit a sweep (re-running the same ``-m`` command skips finished
jobs and resumes the others) and a 2-process DDP run. Each resume must start from the newest complete
checkpoint, and the final weights, EMA, AdamW moments, loss-aware sampler history, RNG state and per-step loss
curve must equal the uninterrupted run's (CPU, deterministic mode). Every test prints its kill log as JSON lines.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from faults import (
    assert_same_curve,
    assert_same_training,
    read_loss_curve,
    subprocess_env,
    train_command,
)
from run_config import TINY

pytestmark = pytest.mark.slow

KILLS = int(os.environ.get("DDPM_KILLS", "12"))
# every attempt trains a few steps before its kill: room for all of them; a multiple of 8 (validation every 4
# steps, in-loop scoring every 2nd validation) so that max_steps has an in-loop score before the final one
STEPS = -(-max(40, 10 * KILLS) // 8) * 8
BASE = [*[o for o in TINY if not o.startswith(("trainer.max_steps", "trainer.val_check_interval"))],
        "trainer.deterministic=true", "trainer.val_check_interval=4",
        "callbacks.periodic_checkpoint.every_n_train_steps=2", "train.timestep_sampler=loss-second-moment"]
# in-loop scoring every 2nd validation and a final score: kills land inside scoring too
SCORED = ["callbacks=metrics", "callbacks.generative_metrics.every_n_val_epochs=2",
          "callbacks.generative_metrics.in_loop_num_samples=4"]
RUN = [*BASE, *SCORED, f"trainer.max_steps={STEPS}", "allow_any_target=true",
       "+callbacks.loss_recorder._target_=faults.LossRecorder"]
SEED = int(os.environ.get("DDPM_KILL_SEED", "0"))
RESUMED = re.compile(r"resume=auto: resuming from (\S+) \(step (\d+)\)")


def _steps_recorded(path: Path) -> int:
    return max(read_loss_curve(path), default=0) if path.is_file() else 0


def _run(command: list[str], timeout: int = 900, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, env=subprocess_env(), timeout=timeout, **kwargs)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """An uninterrupted run (its own process, like the killed ones)."""
    root = tmp_path_factory.mktemp("reference")
    result = _run(train_command([*RUN, f"+callbacks.loss_recorder.path={root / 'losses.txt'}"], root / "run"))
    assert result.returncode == 0, result.stderr[-3000:]
    return root


def _compare(reference: Path, run_dir: Path, losses: Path) -> None:
    assert_same_training(reference / "run" / "checkpoints" / "last.ckpt", run_dir / "checkpoints" / "last.ckpt")
    assert_same_curve(read_loss_curve(reference / "losses.txt"), read_loss_curve(losses))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["global_step"] == STEPS
    reference_scores = json.loads((reference / "run" / "metrics.json").read_text())
    assert json.loads((run_dir / "metrics.json").read_text()).keys() == reference_scores.keys()


def kill_loop(command: list[str], kills: int, rng: random.Random, progress, group: bool = False,
              cwd: Path | None = None) -> list[dict]:
    """Start ``command`` until it exits 0, SIGKILLing it (the whole process group when ``group``: DDP ranks die
    together) after ``progress()`` grew and a random delay until ``kills`` kills landed. Returns the log."""
    log: list[dict] = []
    landed = 0
    for attempt in range(3 * kills + 3):
        done_before = progress()
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                   env=subprocess_env(), start_new_session=group, cwd=cwd)
        killed_at = None
        if landed < kills:
            deadline = time.monotonic() + 300
            while progress() <= done_before and process.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(rng.uniform(0.0, 1.5))
            if process.poll() is None:
                killed_at = progress()
                os.killpg(process.pid, signal.SIGKILL) if group else process.send_signal(signal.SIGKILL)
                landed += 1
        output, _ = process.communicate(timeout=900)
        resumed = RESUMED.findall(output)
        log.append({"attempt": attempt, "returncode": process.returncode, "progress_before": done_before,
                    "killed_at": killed_at, "resumed_from": [(Path(p).name, int(s)) for p, s in resumed]})
        print(json.dumps(log[-1]), flush=True)
        if process.returncode == 0:
            break
        assert process.returncode == -signal.SIGKILL, output[-3000:]
    assert log[-1]["returncode"] == 0, "the run did not finish after the kills"
    assert landed == kills, f"only {landed} of {kills} kills landed before the run finished: {log}"
    return log


def test_random_sigkills_then_resume_matches_an_uninterrupted_run(reference, tmp_path):
    run_dir, losses = tmp_path / "run", tmp_path / "losses.txt"
    command = train_command([*RUN, f"+callbacks.loss_recorder.path={losses}", "resume=auto"], run_dir)
    log = kill_loop(command, KILLS, random.Random(SEED), lambda: _steps_recorded(losses))
    (tmp_path / "kill_log.json").write_text(json.dumps(log, indent=1))
    for before, entry in zip(log, log[1:], strict=False):  # resumes start from the newest complete checkpoint
        if entry["resumed_from"] and before["killed_at"] is not None:
            assert entry["resumed_from"][0][1] >= before["killed_at"] - 2 - 1, entry
    assert not list((run_dir / "checkpoints").glob(".*.tmp-*"))
    _compare(reference, run_dir, losses)
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == STEPS


def test_resume_from_an_epochs_last_batch_then_again_inside_the_next_epoch(reference, tmp_path):
    """Resuming from a checkpoint written on an epoch's last batch, Lightning runs the next epoch without counting
    it as started; a second resume from that epoch's own last batch must still continue exactly (10 batches per
    epoch here: 86 training images, batch 8; the 50-kill loop found this at step 211)."""
    stages = [(None, 12, "periodic-step0000010.ckpt"),  # from scratch; keep the checkpoint of epoch 0's last batch
              ("periodic-step0000010.ckpt", 22, "periodic-step0000020.ckpt"),  # resumed there; epoch 1's last
              ("periodic-step0000020.ckpt", 28, None)]  # resumed there
    for index, (source, stop, keep) in enumerate(stages):
        run_dir = tmp_path / f"stage{index}"
        resume = [f"ckpt_path={tmp_path / source}"] if source else []
        result = _run(train_command([*RUN, f"+callbacks.loss_recorder.path={tmp_path / f'stage{index}.txt'}",
                                     *resume, "+callbacks.kill._target_=faults.KillAt",
                                     f"+callbacks.kill.step={stop}"], run_dir))
        assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
        if keep:
            shutil.copy(run_dir / "checkpoints" / keep, tmp_path / keep)
    expected = read_loss_curve(reference / "losses.txt")
    for index, steps in ((1, range(11, 23)), (2, range(21, 29))):
        resumed = read_loss_curve(tmp_path / f"stage{index}.txt")
        assert sorted(resumed) == list(steps)
        assert_same_curve({s: expected[s] for s in resumed}, resumed)


@pytest.mark.parametrize("phase,step,match,occurrence", [
    ("train", 5, "", 1), ("val", 8, "", 1), ("save", 6, "periodic", 1), ("score", 16, "", 1), ("score", STEPS, "", 2)],
    ids=["train", "val", "checkpoint-write", "in-loop-scoring", "final-scoring"])
def test_sigkill_at_a_chosen_point_then_resume(reference, tmp_path, phase, step, match, occurrence):
    """One kill right after a step, in validation, halfway through a periodic save, in in-loop scoring (every
    2nd validation: step 16), and in the final scoring (after the last checkpoint)."""
    run_dir, losses = tmp_path / "run", tmp_path / "losses.txt"
    fault = ["+callbacks.kill._target_=faults.KillAt", f"+callbacks.kill.step={step}", f"+callbacks.kill.phase={phase}",
             f"+callbacks.kill.occurrence={occurrence}", *([f"+callbacks.kill.match={match}"] if match else [])]
    base = [*RUN, f"+callbacks.loss_recorder.path={losses}", "resume=auto"]
    killed = _run(train_command([*base, *fault], run_dir))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert _steps_recorded(losses) == step
    assert not (run_dir / "summary.json").exists()
    resumed = _run(train_command(base, run_dir))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _compare(reference, run_dir, losses)


# --------------------------------------------------------------------------------------------------- a sweep
SWEEP_KILLS = max(3, KILLS // 10)
SWEEP_STEPS = max(12, 5 * SWEEP_KILLS)  # two jobs: room for every kill before the sweep ends
SWEEP = [*BASE, f"trainer.max_steps={SWEEP_STEPS}", "optim.lr=1e-3,2e-4", "hydra.sweep.subdir=${hydra.job.num}"]


def _sweep_progress(sweep: Path) -> int:
    """Training steps done over the sweep's jobs, from their newest periodic checkpoints' names."""
    steps = [int(p.stem[-7:]) for p in sweep.glob("*/checkpoints/periodic-step*.ckpt")] if sweep.is_dir() else []
    finished = sum(1 for _ in sweep.glob("*/summary.json")) if sweep.is_dir() else 0
    return sum(steps) + finished


def test_random_sigkills_in_a_sweep_then_rerunning_it_matches_an_uninterrupted_sweep(tmp_path):
    reference = _run(train_command(["-m", *SWEEP, f"hydra.sweep.dir={tmp_path / 'reference'}"], tmp_path / "unused"),
                     cwd=tmp_path)
    assert reference.returncode == 0, reference.stderr[-3000:]
    sweep = tmp_path / "sweep"
    command = train_command(["-m", *SWEEP, f"hydra.sweep.dir={sweep}"], tmp_path / "unused")
    log = kill_loop(command, SWEEP_KILLS, random.Random(SEED + 1), lambda: _sweep_progress(sweep), cwd=tmp_path)
    (tmp_path / "kill_log.json").write_text(json.dumps(log, indent=1))
    for job in ("0", "1"):
        assert_same_training(tmp_path / "reference" / job / "checkpoints" / "last.ckpt",
                             sweep / job / "checkpoints" / "last.ckpt")
        assert json.loads((sweep / job / "summary.json").read_text())["global_step"] == SWEEP_STEPS


# ------------------------------------------------------------------------------------------ 2-process DDP
DDP = [*BASE, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", f"trainer.max_steps={SWEEP_STEPS}",
       "callbacks.periodic_checkpoint.every_n_train_steps=2"]


def test_random_sigkills_of_a_two_process_ddp_run_then_resume_matches(tmp_path):
    reference = _run(train_command(DDP, tmp_path / "reference"), cwd=tmp_path)
    assert reference.returncode == 0, reference.stderr[-3000:]
    run_dir = tmp_path / "run"

    def progress() -> int:
        found = [int(p.stem[-7:]) for p in (run_dir / "checkpoints").glob("periodic-step*.ckpt")]
        return max(found, default=0)

    log = kill_loop(train_command([*DDP, "resume=auto"], run_dir), max(2, KILLS // 20), random.Random(SEED + 2),
                    progress, group=True, cwd=tmp_path)
    (tmp_path / "kill_log.json").write_text(json.dumps(log, indent=1))
    assert_same_training(tmp_path / "reference" / "checkpoints" / "last.ckpt", run_dir / "checkpoints" / "last.ckpt")
