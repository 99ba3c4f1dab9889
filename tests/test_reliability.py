"""Crash safety (fast versions): atomic checkpoints, resume=auto past corrupt files, a SIGKILL halfway through
writing a checkpoint resumes exactly, non-finite steps are skipped then stop the run, a failing sweep job
does not stop the others. The random kill -9 loop is tests/test_kill_resume.py (marker ``slow``)."""

from __future__ import annotations

import csv
import json
import logging
import os
import re
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from faults import (
    assert_same_curve,
    assert_same_training,
    read_loss_curve,
    subprocess_env,
    train_command,
)
from hydra.utils import instantiate
from run_config import TINY, compose_run

from ddpm_lightning.artifacts import atomic_torch_save
from ddpm_lightning.callbacks.checkpointing import AtomicCheckpointIO
from ddpm_lightning.callbacks.health import TrainingDiverged, TrainingHealth
from ddpm_lightning.cli.errors import run_cli
from ddpm_lightning.cli.train import build_callbacks, train
from ddpm_lightning.modules.checkpoint import find_resume_checkpoint, remove_stale_temporaries


class SimulatedKill(BaseException):
    """Stands in for SIGKILL in-process (BaseException: nothing on the way catches it)."""


def _fake_checkpoint(step: int) -> dict:
    return {"global_step": step, "state_dict": {"w": torch.full((3,), float(step))}}


# ------------------------------------------------------------------------------------------- atomic writes
def test_atomic_save_leaves_the_old_checkpoint_when_the_write_dies(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    atomic_torch_save(_fake_checkpoint(1), path)
    original = torch.save

    def dies_halfway(obj, f, *args, **kwargs):
        with open(f, "wb") as handle:  # atomic_torch_save passes the temporary file's path
            handle.write(b"PK\x03\x04 half a zip")
        raise SimulatedKill

    monkeypatch.setattr(torch, "save", dies_halfway)
    with pytest.raises(SimulatedKill):
        atomic_torch_save(_fake_checkpoint(2), path)
    monkeypatch.setattr(torch, "save", original)
    assert torch.load(path, weights_only=True)["global_step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_a_killed_write_leaves_only_a_hidden_temporary_that_resume_removes(tmp_path):
    atomic_torch_save(_fake_checkpoint(1), tmp_path / "last.ckpt")
    stale = tmp_path / ".last.ckpt.tmp-12345"  # what SIGKILL during torch.save leaves behind
    stale.write_bytes(b"PK\x03\x04 truncated")
    assert find_resume_checkpoint(tmp_path)[0].name == "last.ckpt"  # the temporary is never a candidate
    assert not stale.exists()
    assert remove_stale_temporaries(tmp_path) == []


def test_trainer_writes_checkpoints_through_the_atomic_plugin(tmp_path):
    cfg = compose_run(TINY, tmp_path)
    trainer = instantiate(cfg.trainer, callbacks=[], logger=False)
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)


# ------------------------------------------------------------------------------------------ resume=auto
def test_resume_auto_skips_truncated_and_foreign_files_newest_first(tmp_path, caplog):
    folder = tmp_path / "checkpoints"
    atomic_torch_save(_fake_checkpoint(2), folder / "periodic-step0000002.ckpt")
    atomic_torch_save(_fake_checkpoint(4), folder / "periodic-step0000004.ckpt")
    atomic_torch_save({"not": "a training checkpoint"}, folder / "notes.ckpt")
    good = (folder / "periodic-step0000004.ckpt").read_bytes()
    (folder / "last.ckpt").write_bytes(good[: len(good) // 2])  # e.g. a non-atomic copy that was cut short
    with caplog.at_level(logging.WARNING, logger="ddpm_lightning.modules.checkpoint"):
        path, checkpoint = find_resume_checkpoint(folder)
    assert path.name == "periodic-step0000004.ckpt" and checkpoint["global_step"] == 4
    assert "last.ckpt" in caplog.text and "corrupt or truncated" in caplog.text
    assert "notes.ckpt" in caplog.text and "not a Lightning training checkpoint" in caplog.text


def test_resume_auto_with_no_loadable_checkpoint_names_every_file(tmp_path):
    folder = tmp_path / "run" / "checkpoints"
    folder.mkdir(parents=True)
    (folder / "last.ckpt").write_bytes(b"garbage")
    (folder / "step0000002.ckpt").write_bytes(b"")
    with pytest.raises(ValueError, match=r"none of the 2 checkpoint\(s\).*last\.ckpt.*step0000002\.ckpt"):
        find_resume_checkpoint(folder)
    cfg = compose_run([*TINY, "resume=auto"], tmp_path / "run")
    with pytest.raises(ValueError, match="none of the 2 checkpoint"):
        train(cfg)
    assert (folder / "last.ckpt").read_bytes() == b"garbage"  # nothing overwritten


# -------------------------------------------------------------------------------- kill -9 mid-checkpoint
KILL_RUN = [*TINY, "trainer.deterministic=true", "trainer.max_steps=6", "trainer.val_check_interval=2",
            "callbacks.periodic_checkpoint.every_n_train_steps=2", "train.timestep_sampler=loss-second-moment",
            "allow_any_target=true", "+callbacks.loss_recorder._target_=faults.LossRecorder"]


def test_sigkill_while_writing_last_ckpt_then_resume_matches_an_uninterrupted_run(tmp_path):
    reference = compose_run([*KILL_RUN, f"+callbacks.loss_recorder.path={tmp_path / 'reference.txt'}"],
                            tmp_path / "reference")
    train(reference)

    run_dir, losses = tmp_path / "killed", tmp_path / "killed.txt"
    killed = subprocess.run(
        train_command([*KILL_RUN, f"+callbacks.loss_recorder.path={losses}", "+callbacks.kill._target_=faults.KillAt",
                       "+callbacks.kill.step=4", "+callbacks.kill.phase=save", "+callbacks.kill.match=last.ckpt"],
                      run_dir),
        capture_output=True, text=True, env=subprocess_env(), timeout=300)
    assert killed.returncode == -9, killed.stderr[-2000:]
    folder = run_dir / "checkpoints"
    half_written = [p for p in folder.iterdir() if p.name.startswith(".last.ckpt.tmp-")]
    assert len(half_written) == 1 and half_written[0].stat().st_size > 0
    # the kill hit last.ckpt's rewrite: the old file is whole (step 2), and newer step-4 files exist
    assert torch.load(folder / "last.ckpt", weights_only=True)["global_step"] == 2
    assert max(read_loss_curve(losses)) == 4

    resumed = compose_run([*KILL_RUN, f"+callbacks.loss_recorder.path={losses}", "resume=auto"], run_dir)
    train(resumed)
    assert not any(p.name.startswith(".") for p in folder.iterdir())  # the half-written file was removed
    assert_same_training(tmp_path / "reference" / "checkpoints" / "last.ckpt", folder / "last.ckpt")
    assert_same_curve(read_loss_curve(tmp_path / "reference.txt"), read_loss_curve(losses))


# --------------------------------------------------------------------------------------- non-finite steps
def test_nonfinite_steps_are_skipped_counted_and_stop_the_run(tmp_path, capsys):
    """NaN loss at steps 2-3 (skipped, training goes on), then from step 5 on: stops after 3 in a row."""
    cfg = compose_run([*TINY, "trainer.max_steps=10", "train.max_nonfinite_steps=3",
                       "callbacks.periodic_checkpoint.every_n_train_steps=1",
                       "callbacks.periodic_checkpoint.save_top_k=-1", "allow_any_target=true",
                       "+callbacks.nan._target_=faults.NaNLossAt", "+callbacks.nan.steps=[2,3,5,6,7,8,9,10]"],
                      tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(train, cfg)
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: training diverged: 3 consecutive steps (5-7)")
    assert "5 in total" in err[0] and "periodic-step0000006.ckpt" in err[0]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "failed" and "diverged" in summary["error"]
    assert (tmp_path / "error.txt").read_text().startswith("training diverged")

    ckpts = {int(p.stem[-7:]): torch.load(p, weights_only=True)
             for p in (tmp_path / "checkpoints").glob("periodic-step*.ckpt")}
    assert sorted(ckpts) == [1, 2, 3, 4, 5, 6]  # nothing written at the step that stopped the run

    def net(step):
        return {k: v for k, v in ckpts[step]["state_dict"].items() if k.startswith("net.")}

    def moments(step):
        return ckpts[step]["optimizer_states"][0]["state"]

    for skipped, before in ((3, 1), (6, 4)):  # skipped steps leave weights and AdamW moments untouched
        for key, value in net(before).items():
            assert torch.equal(net(skipped)[key], value), key
        assert torch.equal(moments(skipped)[0]["exp_avg"], moments(before)[0]["exp_avg"])
    assert any(not torch.equal(net(4)[k], v) for k, v in net(3).items())  # step 4 trained
    assert all(v.isfinite().all() for c in ckpts.values() for v in c["state_dict"].values() if v.is_floating_point())
    assert ckpts[6]["callbacks"]["TrainingHealth"] == {"consecutive": 2, "total": 4}  # survives a resume

    with open(next((tmp_path / "csv").glob("version_*/metrics.csv"))) as handle:
        rows = list(csv.DictReader(handle))
    grad_norms = torch.tensor([float(r["train/grad_norm"]) for r in rows if r.get("train/grad_norm")])
    assert len(grad_norms) == 6 and grad_norms.isnan().sum() == 4 and (grad_norms[grad_norms.isfinite()] > 0).all()


def test_max_nonfinite_steps_is_validated_and_logger_less_runs_drop_the_lr_monitor(tmp_path):
    with pytest.raises(ValueError, match="max_nonfinite_steps must be an integer >= 1 or null"):
        TrainingHealth(max_nonfinite_steps=0)
    cfg = compose_run([*TINY, "logger=none"], tmp_path)
    names = [type(c).__name__ for c in build_callbacks(cfg, has_logger=False)]
    assert "LearningRateMonitor" not in names and names[-1] == "TrainingHealth"
    assert TrainingDiverged.__mro__[1] is RuntimeError


# ------------------------------------------------------------------------------------------------- sweeps
def test_a_failing_sweep_job_does_not_stop_the_others(tmp_path):
    sweep = tmp_path / "sweep"
    result = subprocess.run(
        train_command(["-m", *[o for o in TINY if not o.startswith("trainer.max_steps")], "trainer.max_steps=1",
                       "optim.lr=-1,2e-4",
                       f"hydra.sweep.dir={sweep}", "hydra.sweep.subdir=${hydra.job.num}"], tmp_path / "unused"),
        capture_output=True, text=True, env=subprocess_env(), timeout=300, cwd=tmp_path)
    assert result.returncode != 0
    failed = json.loads((sweep / "0" / "summary.json").read_text())
    assert failed["status"] == "failed" and "optim.lr must be > 0" in failed["error"]
    assert (sweep / "0" / "error.txt").read_text().strip() == failed["error"]
    completed = json.loads((sweep / "1" / "summary.json").read_text())
    assert completed["status"] == "completed" and completed["global_step"] == 1
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()  # Hydra names the job, then our one line (RunFailed is compact)
    failed_at = next(i for i, line in enumerate(lines) if line.startswith("Error executing job with overrides"))
    assert lines[failed_at + 1] == "optim.lr must be > 0, got -1.0"


def _health_step(health: TrainingHealth, loss: float, grad: float, scaler=None, step: int = 0) -> tuple[dict, bool]:
    """One on_before_backward + on_before_optimizer_step on a 1-parameter model; (logged, grads kept)."""
    weight = torch.nn.Parameter(torch.ones(2))
    weight.grad = torch.full((2,), grad)
    optimizer = torch.optim.AdamW([weight])
    logged = {}
    module = SimpleNamespace(device=torch.device("cpu"), log=lambda name, value, **kw: logged.__setitem__(name, value))
    trainer = SimpleNamespace(precision_plugin=SimpleNamespace(scaler=scaler), global_step=step,
                              checkpoint_callbacks=[],
                              strategy=SimpleNamespace(reduce_boolean_decision=lambda decision, all: decision))
    health.on_before_backward(trainer, module, torch.tensor(loss))
    health.on_before_optimizer_step(trainer, module, optimizer)
    return logged, weight.grad is not None


def test_health_rules_with_and_without_a_grad_scaler():
    health = TrainingHealth(max_nonfinite_steps=3)
    logged, kept = _health_step(health, 1.0, 3.0)
    assert kept and logged["train/grad_norm"] == pytest.approx(18 ** 0.5) and "train/loss_scale" not in logged
    _, kept = _health_step(health, 1.0, float("inf"))  # fp32: an inf gradient is skipped and counted
    assert not kept and (health.consecutive, health.total) == (1, 1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    logged, kept = _health_step(health, 1.0, float("inf"), scaler)  # 16-mixed: the scaler's business
    assert kept and logged["train/loss_scale"] == 1024.0 and (health.consecutive, health.total) == (0, 1)
    _, kept = _health_step(health, float("nan"), 1.0, scaler, step=4)  # ... but a NaN loss is skipped under AMP too
    assert not kept and health.total == 2
    _health_step(health, float("nan"), 1.0, step=5)
    with pytest.raises(TrainingDiverged, match=r"3 consecutive steps \(5-7\) .*\(4 in total\); stopped, no checkpoint"):
        _health_step(health, float("inf"), 1.0, step=6)


# ------------------------------------------------------------------------------- run folders: never lose data
def _digest(root) -> dict[str, str]:
    import hashlib

    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != ".run.lock"}


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_a_second_run_into_a_folder_in_use_stops_in_one_line_and_changes_nothing(tmp_path):
    run_dir = tmp_path / "run"
    holder = subprocess.Popen(  # another process owns the folder (as a running ddpm-train does)
        [sys.executable, "-c", "import sys, time; from ddpm_lightning.cli.run_folder import claim; "
                               f"claim({str(run_dir)!r}); print('held', flush=True); time.sleep(120)"],
        stdout=subprocess.PIPE, text=True, env=subprocess_env())
    try:
        assert holder.stdout.readline().strip() == "held"
        (run_dir / "keep.txt").write_text("the first run's file")
        before = _digest(run_dir)
        result = subprocess.run(train_command(TINY, run_dir), capture_output=True, text=True, env=subprocess_env(),
                                timeout=300, cwd=tmp_path)
    finally:
        holder.kill()
        holder.wait()
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines() == [
        f"error: run folder {run_dir.resolve()} is in use by another run (pid {holder.pid}); choose another "
        f"hydra.run.dir, or once that run has stopped continue it with resume=auto"]
    assert _digest(run_dir) == before  # not even .hydra/ was written
    assert not (run_dir / ".hydra").exists()


def test_a_new_run_into_a_finished_or_unfinished_run_folder_is_refused(tmp_path, capsys):
    run_dir = tmp_path / "run"
    train(compose_run(TINY, run_dir))
    finished = _digest(run_dir)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(train, compose_run([*TINY, "trainer.max_steps=2"], run_dir))
    assert exit_info.value.code == 2
    line = _one_error_line(capsys)
    assert line == (f"error: run folder {run_dir} holds a finished run (step 4, summary.json); a new run would "
                    f"overwrite it: choose another hydra.run.dir, or continue it with resume=auto")
    assert _digest(run_dir) == finished  # last.ckpt, summary.json, logs: all unchanged

    (run_dir / "summary.json").unlink()  # a killed run: checkpoints, no summary
    unfinished = _digest(run_dir)
    with pytest.raises(SystemExit):
        run_cli(train, compose_run(TINY, run_dir))
    assert "checkpoint(s) of an unfinished run (last.ckpt" in _one_error_line(capsys)
    assert _digest(run_dir) == unfinished

    # the user says so: resume=auto continues it (at max_steps already: no step, the summary is written again)
    train(compose_run([*TINY, "resume=auto"], run_dir))
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"


def test_resuming_with_another_data_set_or_network_lists_the_differences(tmp_path, capsys):
    train(compose_run(TINY, tmp_path / "first"))
    last = tmp_path / "first" / "checkpoints" / "last.ckpt"
    other_data = [*[o for o in TINY if not o.startswith("data.limit")], "data.limit=80", "trainer.max_steps=6"]
    with pytest.raises(SystemExit):
        run_cli(train, compose_run([*other_data, f"ckpt_path={last}"], tmp_path / "second"))
    line = _one_error_line(capsys)
    assert f"checkpoint {last} was trained with other settings: data.limit=96 in the checkpoint, 80 now" in line
    with pytest.raises(SystemExit):
        run_cli(train, compose_run([*TINY, "trainer.max_steps=6", "model.dropout=0.2", "diffusion.schedule=cosine",
                                    f"ckpt_path={last}"], tmp_path / "third"))
    line = _one_error_line(capsys)
    assert "model.dropout=0.1 in the checkpoint, 0.2 now" in line and "diffusion.schedule='linear'" in line
    with pytest.raises(SystemExit):  # nothing left to train: said, not a silent 0-step "completed" run
        run_cli(train, compose_run([*TINY, f"ckpt_path={last}"], tmp_path / "fourth"))
    assert f"ckpt_path={last} is at step 4, trainer.max_steps=4: nothing to train" in _one_error_line(capsys)
    assert not (tmp_path / "fourth" / "summary.json").exists() or \
        json.loads((tmp_path / "fourth" / "summary.json").read_text())["status"] == "failed"


def test_a_changed_optimiser_on_resume_is_applied_said_once_and_followed_by_the_logged_lr(tmp_path, caplog):
    """modules.checkpoint.RESUME_APPLIED: optim.lr (and the other optimiser settings) changed on resume apply from
    the resume step on; the logged LR, the optimiser state and the checkpoint's run config follow the new value."""
    run_dir = tmp_path / "run"
    run = [*TINY, "optim.warmup_steps=0", "trainer.val_check_interval=2"]  # constant LR: what is logged is the LR
    train(compose_run([*run, "optim.lr=2e-4", "optim.weight_decay=0.0"], run_dir))
    caplog.set_level(logging.INFO)
    train(compose_run([*run, "optim.lr=1e-3", "optim.weight_decay=0.01", "trainer.max_steps=7", "resume=auto"],
                      run_dir))
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("resume: step")]
    assert said == ["resume: step 4 continues with the changed optim.lr: 0.0002 -> 0.001; optim.weight_decay: "
                    "0.0 -> 0.01"]
    logged = {}
    for path in sorted((run_dir / "csv").glob("version_*/metrics.csv")):
        with open(path) as handle:
            logged |= {int(r["step"]): float(r["lr-AdamW"]) for r in csv.DictReader(handle) if r.get("lr-AdamW")}
    assert {step: lr for step, lr in logged.items()} == {0: 2e-4, 1: 2e-4, 2: 2e-4, 3: 2e-4,
                                                          4: pytest.approx(1e-3), 5: pytest.approx(1e-3),
                                                          6: pytest.approx(1e-3)}
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    group = last["optimizer_states"][0]["param_groups"][0]
    assert group["lr"] == pytest.approx(1e-3) and group["weight_decay"] == 0.01
    assert last["run_config"]["optim"]["lr"] == 1e-3  # a later resume compares against what this run trained with


def test_a_changed_batch_seed_or_timestep_sampler_on_resume_is_refused_listing_them(tmp_path, capsys):
    """modules.checkpoint.RESUME_REFUSED: what the step counts, the data position or the restored random state
    depend on is refused like a changed network, every difference listed (the same global batch on fewer
    processes continues: tests/test_ddp.py)."""
    train(compose_run(TINY, tmp_path / "first"))
    last = tmp_path / "first" / "checkpoints" / "last.ckpt"
    changed = [*[o for o in TINY if not o.startswith("data.batch_size")], "data.batch_size=4", "seed=1",
               "train.timestep_sampler=loss-second-moment", "trainer.max_steps=6", f"ckpt_path={last}"]
    with pytest.raises(SystemExit):
        run_cli(train, compose_run(changed, tmp_path / "second"))
    assert _one_error_line(capsys) == (
        f"error: checkpoint {last} was trained with other settings: the global batch (data.batch_size x "
        f"trainer.devices x trainer.num_nodes x trainer.accumulate_grad_batches) 8 x 1 x 1 x 1 = 8 in the checkpoint, "
        f"4 x 1 x 1 x 1 = 4 now (data.batch_size=8 keeps it); train.timestep_sampler='uniform' in the checkpoint, "
        f"'loss-second-moment' now; "
        f"seed=0 in the checkpoint, 1 now; resume with the checkpoint's settings, or start a new run folder without "
        f"ckpt_path")


# ------------------------------------------------------------------------------------------------ full disk
def test_a_full_disk_keeps_the_previous_file_and_says_so_in_one_line(tmp_path, monkeypatch, capsys):
    import errno

    from ddpm_lightning import artifacts

    path = tmp_path / "summary.json"
    artifacts.write_json(path, {"status": "completed"})
    real_fsync = os.fsync

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(artifacts.NoSpaceLeft, match=f"^no space left on {path}; free some space"):
        artifacts.write_json(path, {"status": "overwritten"})
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert json.loads(path.read_text()) == {"status": "completed"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]  # no temporary left

    # in a training run: the checkpoint write fails (as on a full disk), the run stops in one line
    run_dir = tmp_path / "run"
    cfg = compose_run([*TINY, "trainer.max_steps=2", "callbacks.periodic_checkpoint.every_n_train_steps=1"], run_dir)
    original = torch.save
    calls = []

    def save_then_fill_the_disk(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_then_fill_the_disk)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(train, cfg)
    monkeypatch.setattr(torch, "save", original)
    assert exit_info.value.code == 2
    line = _one_error_line(capsys)
    assert re.match(rf"error: no space left on {run_dir}/checkpoints/\S+\.ckpt; free some space", line), line
    kept = torch.load(run_dir / "checkpoints" / "periodic-step0000001.ckpt", weights_only=True)
    assert kept["global_step"] == 1  # the step-1 checkpoint is whole
    assert not [p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".")]


def test_checkpoints_that_cannot_fit_are_refused_before_training(tmp_path, monkeypatch, capsys):
    from ddpm_lightning import artifacts

    monkeypatch.setattr(artifacts, "free_bytes", lambda path: 1000)
    with pytest.raises(SystemExit):
        run_cli(train, compose_run(TINY, tmp_path / "run"))
    line = _one_error_line(capsys)
    assert re.match(rf"error: no space left on {tmp_path / 'run'} \(the 5 checkpoint\(s\) this run keeps: about "
                    r"[\d.]+ MiB needed, 1000 B free\); free some space", line), line
    assert not (tmp_path / "run" / "checkpoints").exists()


# ---------------------------------------------------------------------------------- sweeps survive interruption
def test_rerunning_a_half_finished_sweep_skips_finished_jobs_and_resumes_the_others(tmp_path):
    sweep = tmp_path / "sweep"
    command = train_command(["-m", *[o for o in TINY if not o.startswith("trainer.max_steps")],
                             "trainer.max_steps=2", "trainer.val_check_interval=2", "optim.lr=1e-3,2e-4",
                             f"hydra.sweep.dir={sweep}", "hydra.sweep.subdir=${hydra.job.num}"], tmp_path / "unused")
    first = subprocess.run(command, capture_output=True, text=True, env=subprocess_env(), timeout=300, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    finished = _digest(sweep / "0")
    (sweep / "1" / "summary.json").unlink()  # job 1 was killed after its last checkpoint
    second = subprocess.run(command, capture_output=True, text=True, env=subprocess_env(), timeout=300, cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-2000:]
    output = second.stdout + second.stderr
    assert f"skipping finished sweep job {sweep / '0'} (step 2)" in output
    assert re.search(rf"sweep job folder {sweep / '1'} holds \d checkpoint\(s\) of an unfinished run .*: resuming it",
                     output)
    assert "resume=auto: resuming from" in output and "last.ckpt (step 2)" in output
    def results(digest):  # Hydra rewrites its own .hydra/ and appends to train.log; the run's files stay
        return {k: v for k, v in digest.items() if not k.startswith(".hydra") and k != "train.log"}

    assert results(_digest(sweep / "0")) == results(finished) and "summary.json" in finished
    resumed = json.loads((sweep / "1" / "summary.json").read_text())
    assert resumed["status"] == "completed" and resumed["global_step"] == 2
    assert [float(o.split("=")[1]) for o in resumed["overrides"] if o.startswith("optim.lr=")] == [2e-4]


def test_sweep_with_a_bad_option_in_a_later_job_starts_no_job(tmp_path):
    sweep = tmp_path / "sweep"
    result = subprocess.run(
        train_command(["-m", *TINY, "diffusion.schedule=linear,cosin", f"hydra.sweep.dir={sweep}"],
                      tmp_path / "unused"), capture_output=True, text=True, env=subprocess_env(), timeout=300,
        cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: sweep job 1 (diffusion.schedule=cosin): diffusion.schedule='cosin' is not an option; allowed: "
        "linear, cosine (did you mean cosine?); no job was started"]
    assert [p.name for p in sweep.iterdir()] == [".run.lock"]  # no job folder


# ------------------------------------------------------------------------------------------- the smoke setting
def test_debug_fast_trains_and_scores_the_default_experiment(tmp_path):
    """``ddpm-train experiment=default debug=fast``: no other key needed (callbacks=default is not)."""
    cfg = compose_run(["experiment=default", "debug=fast"], tmp_path)
    assert cfg.trainer.max_steps == 3 and cfg.callbacks.generative_metrics.feature == "tiny"
    metrics = train(cfg)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["global_step"] == 3
    assert "val/fid@8" in metrics and any(k.startswith("val/kid") for k in metrics), sorted(metrics)
    assert json.loads((tmp_path / "metrics.json").read_text())["num_samples"] == 8


def test_resume_is_exact_with_in_loop_scoring(tmp_path):
    """Scoring (its setup at fit start, and each in-loop score) must not move the global random state that
    training draws from, and the in-loop schedule (every 2nd validation) survives a resume."""
    run = [*[o for o in TINY if not o.startswith(("trainer.max_steps", "trainer.val_check_interval"))],
           "trainer.deterministic=true", "trainer.val_check_interval=2",
           "callbacks.periodic_checkpoint.every_n_train_steps=2", "callbacks=metrics",
           "callbacks.generative_metrics.every_n_val_epochs=2", "callbacks.generative_metrics.in_loop_num_samples=4",
           "callbacks.generative_metrics.on_train_end=false"]
    train(compose_run([*run, "trainer.max_steps=8"], tmp_path / "reference"))
    train(compose_run([*run, "trainer.max_steps=2"], tmp_path / "resumed"))
    (tmp_path / "resumed" / "summary.json").unlink()  # as if killed after its step-2 checkpoint (1 validation)
    train(compose_run([*run, "trainer.max_steps=8", "resume=auto"], tmp_path / "resumed"))
    assert_same_training(tmp_path / "reference" / "checkpoints" / "last.ckpt",
                         tmp_path / "resumed" / "checkpoints" / "last.ckpt")

    def scored_steps(run_dir):  # over the csv versions of every attempt
        steps = set()
        for path in (run_dir / "csv").glob("version_*/metrics.csv"):
            with open(path) as handle:
                steps |= {int(r["step"]) for r in csv.DictReader(handle) if r.get("val/fid@4")}
        return sorted(steps)

    assert scored_steps(tmp_path / "reference") == scored_steps(tmp_path / "resumed") == [3, 7]


def test_training_says_its_work_and_estimated_time_in_the_first_steps(tmp_path, caplog):
    """Before work: the steps x batch and max_time; after a few timed steps: ``estimated time:`` (no timing
    asserted, only that the lines are there)."""
    caplog.set_level(logging.INFO)
    train(compose_run([*TINY, "logger=none", "trainer.max_time=00:01:00:00"], tmp_path))
    lines = [r.getMessage() for r in caplog.records]
    assert any(line.startswith("training: 4 optimizer steps x batch 8; trainer.max_time stops it after 60.0 min")
               for line in lines), lines
    assert any(re.match(r"estimated time: ~\d+\.\d min for 4 optimizer steps \(\d+\.\d\d s/step over steps 1-4",
                        line) for line in lines), lines


def test_scoring_estimate_leaves_a_first_call_per_batch_size_out_of_the_timing(monkeypatch):
    """Under ``model.compile`` the first call at each batch size compiles (minutes). The warm-up must be at the
    timed size, or the compile lands in the timed call and is extrapolated to every sample (the estimate read ~900
    min). A driven clock: each network call costs 0.01 s per image, features 0.001 s per image, and the first
    call at a new batch size another 100 s."""
    from ddpm_lightning.callbacks import generative_metrics
    from ddpm_lightning.config.schema import SampleConfig

    clock = SimpleNamespace(now=0.0, sizes=set())
    monkeypatch.setattr(generative_metrics, "time", SimpleNamespace(perf_counter=lambda: clock.now))

    class CompilingModule:
        def sampling_process(self, settings):
            return SimpleNamespace(num_timesteps=settings.steps)

        def sample(self, n, settings, **_):
            clock.now += (100.0 if n not in clock.sizes else 0.0) + 0.01 * n * settings.steps
            clock.sizes.add(n)
            return torch.zeros(n, 1, 4, 4), None

    class Scorer:
        def outputs(self, images):
            clock.now += 0.001 * len(images)

    callback = generative_metrics.GenerativeMetricsCallback(num_samples=500)
    callback.settings = SampleConfig(method="ddpm", steps=15, batch_size=64)
    callback._scorer = Scorer()
    trainer = SimpleNamespace(precision_plugin=SimpleNamespace(forward_context=torch.no_grad))
    per_sample = callback._time_one_sample(trainer, CompilingModule())
    assert per_sample == pytest.approx(0.01 * 15 + 0.001)  # 15 calls + features, no compile in it
