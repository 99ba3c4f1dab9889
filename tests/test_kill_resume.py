"""kill -9 at random points, then ``resume=auto``: the run ends exactly where an uninterrupted one does.

Slow (``pytest -m slow tests/test_kill_resume.py``): every attempt is a fresh ``python -m ddpm_lightning.train``.
Kills land during steps, during validation and while checkpoints are written; each resume must start from
the newest complete checkpoint and the final weights, EMA, AdamW moments, loss-aware sampler history, RNG
state and the per-step loss curve must equal the uninterrupted run's (CPU, deterministic mode).
"""

from __future__ import annotations

import json
import os
import random
import re
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

STEPS = 40
RUN = [*[o for o in TINY if not o.startswith(("trainer.max_steps", "trainer.val_check_interval"))],
       "trainer.deterministic=true", f"trainer.max_steps={STEPS}", "trainer.val_check_interval=4",
       "callbacks.periodic_checkpoint.every_n_train_steps=2", "train.timestep_sampler=loss-second-moment",
       "allow_any_target=true", "+callbacks.loss_recorder._target_=faults.LossRecorder"]
KILLS = int(os.environ.get("DDPM_KILLS", "12"))
RESUMED = re.compile(r"resume=auto: resuming from (\S+) \(step (\d+)\)")


def _steps_recorded(path: Path) -> int:
    return max(read_loss_curve(path), default=0) if path.is_file() else 0


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """An uninterrupted run (its own process, like the killed ones)."""
    root = tmp_path_factory.mktemp("reference")
    result = subprocess.run(train_command([*RUN, f"+callbacks.loss_recorder.path={root / 'losses.txt'}"],
                                          root / "run"),
                            capture_output=True, text=True, env=subprocess_env(), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return root


def _compare(reference: Path, run_dir: Path, losses: Path) -> None:
    assert_same_training(reference / "run" / "checkpoints" / "last.ckpt", run_dir / "checkpoints" / "last.ckpt")
    assert_same_curve(read_loss_curve(reference / "losses.txt"), read_loss_curve(losses))


def test_random_sigkills_then_resume_matches_an_uninterrupted_run(reference, tmp_path):
    rng = random.Random(int(os.environ.get("DDPM_KILL_SEED", "0")))
    run_dir, losses = tmp_path / "run", tmp_path / "losses.txt"
    command = train_command([*RUN, f"+callbacks.loss_recorder.path={losses}", "resume=auto"], run_dir)
    log = []
    for attempt in range(KILLS + 1):
        done_before = _steps_recorded(losses)
        tmp_before = sorted(p.name for p in (run_dir / "checkpoints").glob(".*.tmp-*"))
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                   env=subprocess_env())
        killed_at = None
        if attempt < KILLS:
            deadline = time.monotonic() + 300
            # wait until this attempt has trained at least one step, then kill after a random delay
            while _steps_recorded(losses) <= done_before and process.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(rng.uniform(0.0, 1.0))
            if process.poll() is None:
                process.send_signal(signal.SIGKILL)
                killed_at = _steps_recorded(losses)
        output, _ = process.communicate(timeout=600)
        resumed = RESUMED.search(output)
        tmp_after = sorted(p.name for p in (run_dir / "checkpoints").glob(".*.tmp-*"))
        log.append({"attempt": attempt, "returncode": process.returncode, "steps_done_before": done_before,
                    "resumed_from": None if resumed is None else (Path(resumed[1]).name, int(resumed[2])),
                    "stale_tmp_removed": tmp_before, "killed_after_step": killed_at,
                    "killed_mid_checkpoint_write": [n for n in tmp_after if n not in tmp_before]})
        print(json.dumps(log[-1]), flush=True)
        if process.returncode == 0:
            break
        assert process.returncode == -signal.SIGKILL, output[-3000:]
        # resumes start from the newest complete checkpoint: saves every 2 steps, one of them possibly cut short
        if resumed is not None:
            assert int(resumed[2]) >= done_before - 2, log[-1]
    (tmp_path / "kill_log.json").write_text(json.dumps(log, indent=1))
    assert log[-1]["returncode"] == 0, "the run did not finish after the kills"
    assert sum(entry["killed_after_step"] is not None for entry in log) >= min(KILLS, 3)
    _compare(reference, run_dir, losses)
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == STEPS


@pytest.mark.parametrize("phase,step,match", [("train", 5, ""), ("val", 8, ""), ("save", 6, "periodic")])
def test_sigkill_at_a_chosen_point_then_resume(reference, tmp_path, phase, step, match):
    """One kill right after a step, one in the middle of validation, one halfway through a periodic save."""
    run_dir, losses = tmp_path / "run", tmp_path / "losses.txt"
    fault = ["+callbacks.kill._target_=faults.KillAt", f"+callbacks.kill.step={step}", f"+callbacks.kill.phase={phase}",
             *([f"+callbacks.kill.match={match}"] if match else [])]
    base = [*RUN, f"+callbacks.loss_recorder.path={losses}", "resume=auto"]
    killed = subprocess.run(train_command([*base, *fault], run_dir), capture_output=True, text=True,
                            env=subprocess_env(), timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert _steps_recorded(losses) == step
    resumed = subprocess.run(train_command(base, run_dir), capture_output=True, text=True, env=subprocess_env(),
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _compare(reference, run_dir, losses)
