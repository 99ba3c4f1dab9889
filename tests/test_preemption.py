"""Signals sent to a real ``ddpm-train`` process: SIGTERM stops it in every phase (exit 143) and leaves every
complete checkpoint loadable; the requeue signal (SIGUSR1) during the final scoring exits 75 with the final
state saved, and the requeued run finishes. (The requeue signal during training, with the exact continuation,
is tested under DDP in ``test_ddp.py``.)"""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from faults import subprocess_env, train_command
from run_config import TINY

from ddpm_lightning.callbacks.preemption import REQUEUE_EXIT_CODE, TERM_EXIT_CODE, mark_stopped_epoch_unfinished

RUN = [*[o for o in TINY if not o.startswith("trainer.max_steps")], "trainer.max_steps=4",
       "callbacks.periodic_checkpoint.every_n_train_steps=1", "allow_any_target=true", "resume=auto"]


def _pause(phase: str, step: int, marker: Path, match: str = "") -> list[str]:
    return ["+callbacks.pause._target_=faults.PauseAt", f"+callbacks.pause.step={step}",
            f"+callbacks.pause.phase={phase}", f"+callbacks.pause.marker={marker}",
            *([f"+callbacks.pause.match={match}"] if match else [])]


def signal_when_paused(command: list[str], marker: Path, signum: int) -> tuple[subprocess.CompletedProcess, float]:
    """Start ``command``, send ``signum`` once ``marker`` exists; the finished process and the seconds it took
    to exit after the signal."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=subprocess_env())
    deadline = time.monotonic() + 300
    while not marker.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert marker.exists(), process.communicate()[1][-3000:]
    sent = time.monotonic()
    process.send_signal(signum)
    out, err = process.communicate(timeout=120)  # a hang guard, not a timing assert
    elapsed = time.monotonic() - sent
    print(f"{signal.Signals(signum).name}: exited {process.returncode} {elapsed:.2f} s after the signal")
    return subprocess.CompletedProcess(command, process.returncode, out, err), elapsed


def _checkpoints_intact(folder: Path) -> list[int]:
    assert not list(folder.glob(".*.tmp-*")), "a half-written checkpoint was left behind"
    return sorted(torch.load(p, weights_only=True)["global_step"] for p in folder.glob("*.ckpt"))


@pytest.mark.parametrize("phase,step,match", [("train", 2, ""), ("val", 4, ""), ("final", 4, ""),
                                              ("save", 3, "periodic")])
def test_sigterm_stops_the_run_in_every_phase(tmp_path, phase, step, match):
    marker = tmp_path / "paused"
    result, _ = signal_when_paused(train_command([*RUN, *_pause(phase, step, marker, match)], tmp_path / "run"),
                                   marker, signal.SIGTERM)
    assert result.returncode == TERM_EXIT_CODE, result.stderr[-3000:]
    assert "received SIGTERM: stopping now (exit code 143)" in result.stderr
    assert "Traceback" not in result.stderr
    steps = _checkpoints_intact(tmp_path / "run" / "checkpoints")
    # paused before that step's checkpoint ("train"), or in the middle of writing it ("save"): the previous one
    assert steps and max(steps) == (step - 1 if phase in ("train", "save") else step)
    assert not (tmp_path / "run" / "summary.json").exists()  # the run did not finish: nothing claims it did


@pytest.mark.parametrize("signum", [signal.SIGUSR1, signal.SIGUSR2])  # Lightning's / submitit's requeue signal
def test_requeue_signal_during_final_scoring_exits_for_requeue_then_finishes(tmp_path, signum):
    marker, run_dir = tmp_path / "paused", tmp_path / "run"
    result, _ = signal_when_paused(train_command([*RUN, *_pause("final", 4, marker)], run_dir), marker, signum)
    assert result.returncode == REQUEUE_EXIT_CODE, result.stderr[-3000:]
    assert f"received {signal.Signals(signum).name}: checkpoint of step 4 written, exiting for requeue (exit code 75)" \
        in result.stderr
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 4
    again = subprocess.run(train_command(RUN, run_dir), capture_output=True, text=True, env=subprocess_env(),
                           timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming from" in again.stdout + again.stderr
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4


def test_a_stopped_epoch_is_saved_as_unfinished():
    """Lightning counts an epoch stopped by max_steps as finished; the checkpoint says it is not."""
    tracker = {"ready": 1, "completed": 1, "started": 1, "processed": 1}
    checkpoint = {"loops": {"fit_loop": {"epoch_progress": {"total": dict(tracker), "current": dict(tracker)}}}}
    mark_stopped_epoch_unfinished(checkpoint, epoch=0)
    assert checkpoint["loops"]["fit_loop"]["epoch_progress"]["current"] == {
        "ready": 1, "completed": 0, "started": 1, "processed": 0}


def test_stops_at_an_epoch_end_and_mid_epoch_resume_exactly(tmp_path):
    """max_steps at an epoch's last batch (10 batches per epoch), then mid-epoch (13), each time with only the
    end-of-training checkpoint to resume from: the run ends where an uninterrupted one does, bit for bit."""
    from run_config import compose_run

    from ddpm_lightning.cli.train import train

    common = [*[o for o in TINY if not o.startswith("trainer.max_steps")], "seed=3", "resume=auto"]
    every_step = ["callbacks.periodic_checkpoint.every_n_train_steps=1", "callbacks.periodic_checkpoint.save_top_k=-1"]
    train(compose_run([*common, *every_step, "trainer.max_steps=14"], tmp_path / "full"))
    for steps in (10, 13):
        train(compose_run([*common, f"trainer.max_steps={steps}", "trainer.val_check_interval=100"], tmp_path / "part"))
        last = torch.load(tmp_path / "part" / "checkpoints" / "last.ckpt", weights_only=True)
        assert last["global_step"] == steps  # written when training ended (no other checkpoint at this step)
    train(compose_run([*common, *every_step, "trainer.max_steps=14"], tmp_path / "part"))
    full, part = (torch.load(tmp_path / run / "checkpoints" / "periodic-step0000014.ckpt", weights_only=True)
                  for run in ("full", "part"))
    assert full["epoch"] == part["epoch"] == 1
    for key, value in full["state_dict"].items():
        assert torch.equal(part["state_dict"][key], value), key
    key = "epoch_loop.batch_progress"
    assert full["loops"]["fit_loop"][key] == part["loops"]["fit_loop"][key]
