"""Multi-process training on CPU (gloo): per-rank randomness, exact resume, the requeue signal, world-size changes.

The 2-process runs are real ``ddpm-train`` subprocesses with ``trainer=ddp`` (under pytest, in-process ``ddp``
would re-launch pytest itself), tiny settings, gradient accumulation and the loss-aware timestep sampler.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from faults import subprocess_env, train_command
from run_config import TINY, compose_run
from test_preemption import signal_when_paused

from ddpm_lightning.callbacks.preemption import REQUEUE_EXIT_CODE
from ddpm_lightning.cli.train import train
from ddpm_lightning.data.sampler import ResumableShuffleSampler

STEPS = 6
DDP = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"]
# 86 training images, 8 per rank: 5 batches per epoch and rank, 3 optimizer steps per epoch with accumulation 2
RUN = [*[o for o in TINY if not o.startswith("trainer.max_steps")], f"trainer.max_steps={STEPS}", "seed=3",
       "++trainer.accumulate_grad_batches=2", "train.timestep_sampler=loss-second-moment",
       "callbacks.periodic_checkpoint.every_n_train_steps=1", "callbacks.periodic_checkpoint.save_top_k=-1",
       "allow_any_target=true", "resume=auto"]


def _ckpt(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"periodic-step{step:07d}.ckpt"


def assert_identical_training(path_a: Path, path_b: Path, same_loop_state: bool = True) -> None:
    """Bit for bit: weights and EMA, AdamW moments, LR schedule, loss-aware sampler history, loop position
    (``same_loop_state``: checkpoints saved at different hooks of the same step may record it differently)."""
    a, b = (torch.load(p, map_location="cpu", weights_only=True) for p in (path_a, path_b))
    assert a["global_step"] == b["global_step"] and a["epoch"] == b["epoch"]
    assert a["state_dict"].keys() == b["state_dict"].keys()
    differ = [k for k, v in a["state_dict"].items() if not torch.equal(v, b["state_dict"][k])]
    assert not differ, f"{len(differ)} tensors differ, e.g. {differ[:3]}"
    for index, moments in a["optimizer_states"][0]["state"].items():
        for name, value in moments.items():
            assert torch.equal(value, b["optimizer_states"][0]["state"][index][name]), f"{index}.{name}"
    assert a["lr_schedulers"] == b["lr_schedulers"]
    for name, value in a["timestep_sampler"].items():
        assert torch.equal(value, b["timestep_sampler"][name]), name
    if same_loop_state:  # the position: epoch (above), batch in the epoch, optimizer steps
        loop_a, loop_b = a["loops"]["fit_loop"], b["loops"]["fit_loop"]
        for key in ("epoch_loop.batch_progress", "epoch_loop.automatic_optimization.optim_progress"):
            assert loop_a[key] == loop_b[key], key


def _run(overrides: list[str], run_dir: Path) -> subprocess.CompletedProcess:
    return subprocess.run(train_command(overrides, run_dir), capture_output=True, text=True, env=subprocess_env(),
                          timeout=600)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """An uninterrupted 2-process run that records every rank's draws."""
    root = tmp_path_factory.mktemp("ddp_reference")
    result = _run([*RUN, *DDP, "+callbacks.draws._target_=faults.DrawRecorder",
                   f"+callbacks.draws.path={root / 'draws'}"], root / "run")
    assert result.returncode == 0, result.stderr[-3000:]
    return root


@pytest.fixture(scope="module")
def requeued(tmp_path_factory) -> Path:
    """The same run, sent SIGUSR1 (rank 0 only) while it trains step 2: it saves and exits for requeue."""
    root = tmp_path_factory.mktemp("ddp_requeued")
    marker = root / "paused"
    # rank 0 waits at step 2 until the signal has arrived (rank 1 waits for it in step 3's gradient all-reduce)
    pause = ["+callbacks.pause._target_=faults.PauseAt", "+callbacks.pause.step=2", "+callbacks.pause.phase=train",
             f"+callbacks.pause.marker={marker}", "+callbacks.pause.rank=0", "+callbacks.pause.until=SIGUSR1"]
    result, seconds = signal_when_paused(train_command([*RUN, *DDP, *pause], root / "run"), marker, signal.SIGUSR1)
    assert result.returncode == REQUEUE_EXIT_CODE, result.stderr[-3000:]
    assert "checkpoint of step 3 written, exiting for requeue (exit code 75)" in result.stderr
    shutil.copytree(root / "run", root / "snapshot")
    return root


def test_ranks_draw_their_own_t_and_noise_from_identical_weights(reference):
    ranks = [torch.load(reference / f"draws.rank{r}.pt", weights_only=True) for r in (0, 1)]
    for key in ranks[0]["initial"]:
        assert torch.equal(ranks[0]["initial"][key], ranks[1]["initial"][key]), key  # same init, before DDP
    for key in ranks[0]["weights"]:
        assert torch.equal(ranks[0]["weights"][key], ranks[1]["weights"][key]), key  # in sync at the end
    draws0, draws1 = ranks[0]["draws"], ranks[1]["draws"]
    assert len(draws0) == len(draws1) == 10  # 6 steps x 2 micro-batches, minus the 2 short epoch ends
    for a, b in zip(draws0, draws1, strict=True):
        assert a["step"] == b["step"]
        assert not torch.equal(a["noise"], b["noise"])
        assert not torch.equal(a["t"], b["t"])
    all_t = torch.cat([d["t"] for d in draws0])
    assert len(all_t.unique()) > 10  # and steps differ from each other


def test_requeue_signal_checkpoint_equals_an_uninterrupted_run_then_resumes_exactly(reference, requeued):
    run_dir = requeued / "run"
    # two runs with the same seed and world size: identical checkpoints at step 3
    # (the periodic checkpoint of step 3, the end of epoch 0, is written at the epoch's end, last.ckpt at the step's)
    assert_identical_training(_ckpt(reference / "run", 3), run_dir / "checkpoints" / "last.ckpt",
                              same_loop_state=False)
    resumed = _run([*RUN, *DDP], run_dir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout + resumed.stderr
    for step in (4, 5, 6):
        assert_identical_training(_ckpt(reference / "run", step), _ckpt(run_dir, step))


def test_resuming_with_another_global_batch_stops_with_one_line(requeued, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(requeued / "snapshot", run_dir)
    result = _run([*RUN, "trainer.devices=1"], run_dir)  # 1 x 8 instead of 2 x 8
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith(
        f"error: checkpoint {run_dir / 'checkpoints' / 'last.ckpt'} was trained with other settings: the global batch "
        f"(data.batch_size x trainer.devices x trainer.num_nodes x trainer.accumulate_grad_batches) 8 x 2 x 1 x 2 = 32 "
        f"in the checkpoint, 8 x 1 x 1 x 2 = 16 now (data.batch_size=16 keeps it)"), lines[-3:]
    assert "Traceback" not in result.stderr
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 3  # untouched


def test_resuming_with_the_same_global_batch_on_fewer_processes_continues(requeued, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(requeued / "snapshot", run_dir)
    result = _run([*RUN, "trainer.devices=1", "data.batch_size=16", "trainer.max_steps=4"], run_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert torch.load(_ckpt(run_dir, 4), weights_only=True)["global_step"] == 4


def _alive(run_dir: Path) -> list[int]:
    """Processes whose command line names ``run_dir`` (the DDP ranks of that run)."""
    alive = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and str(run_dir).encode() in (proc / "cmdline").read_bytes():
                alive.append(int(proc.name))
        except OSError:
            continue
    return alive


def test_sigterm_to_the_first_rank_stops_every_rank_even_one_blocked_in_a_collective(tmp_path):
    """As ``timeout`` does: SIGTERM to the launched process only. Rank 1 pauses (in Python) while rank 0 waits
    for it in the gradient all-reduce (in C, where no Python handler runs): both end, with exit code 143."""
    marker, run_dir = tmp_path / "paused", tmp_path / "run"
    pause = ["+callbacks.pause._target_=faults.PauseAt", "+callbacks.pause.step=2", "+callbacks.pause.phase=train",
             f"+callbacks.pause.marker={marker}", "+callbacks.pause.rank=1", "+callbacks.pause.seconds=300"]
    result, seconds = signal_when_paused(train_command([*RUN, *DDP, *pause], run_dir), marker, signal.SIGTERM)
    assert result.returncode == 143, result.stderr[-3000:]
    deadline = time.monotonic() + 30  # a hang guard for rank 1, not a timing assert
    while _alive(run_dir) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _alive(run_dir), "a DDP rank outlived the SIGTERM"
    steps = sorted(torch.load(p, weights_only=True)["global_step"] for p in (run_dir / "checkpoints").glob("*.ckpt"))
    assert steps and max(steps) <= 2
    assert not list((run_dir / "checkpoints").glob(".*.tmp-*"))


def test_sigkill_under_ddp_then_resume_matches(reference, tmp_path):
    run_dir = tmp_path / "run"
    kill = ["+callbacks.kill._target_=faults.KillAt", "+callbacks.kill.step=4", "+callbacks.kill.phase=train"]
    killed = _run([*RUN, *DDP, *kill], run_dir)
    assert killed.returncode != 0
    resumed = _run([*RUN, *DDP], run_dir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_identical_training(_ckpt(reference / "run", STEPS), _ckpt(run_dir, STEPS))


# ------------------------------------------------------------------------------------------ the sampler
def _epoch(sampler: ResumableShuffleSampler) -> list[list[int]]:
    """One iteration of ``sampler`` cut into its batches."""
    items = list(sampler)
    return [items[k:k + sampler.batch_size] for k in range(0, len(items), sampler.batch_size)]


def _global_batches(n: int, world: int, batch: int, epoch: int = 0, start: int = 0) -> list[list[int]]:
    per_rank = []
    for rank in range(world):
        sampler = ResumableShuffleSampler(n, seed=5, num_replicas=world, rank=rank, batch_size=batch)
        sampler.resume_at(epoch, start)
        per_rank.append(_epoch(sampler))
    return [sum((per_rank[r][k] for r in range(world)), []) for k in range(len(per_rank[0]))]


def test_sampler_splits_every_global_batch_over_the_ranks():
    batches = _global_batches(50, world=2, batch=4)
    assert len(batches) == 6  # 50 // 8, the last partial global batch dropped
    flat = sum(batches, [])
    assert len(set(flat)) == 48
    assert flat == ResumableShuffleSampler(50, seed=5).permutation(0)[:48].tolist()
    assert len(ResumableShuffleSampler(50, seed=5, num_replicas=2, rank=1, batch_size=4)) == 24


def test_sampler_resumes_at_the_same_item_for_any_split_of_the_global_batch():
    """No image repeated or skipped within the epoch when 2 x 4 resumes as 1 x 8 or 4 x 2."""
    done = 16
    full = _global_batches(50, world=1, batch=8, epoch=2)
    for world, batch in ((2, 4), (4, 2), (1, 8)):
        rest = _global_batches(50, world=world, batch=batch, epoch=2, start=done)
        assert [sorted(b) for b in rest] == [sorted(b) for b in full[done // 8:]]
    with pytest.raises(ValueError, match="not a multiple of the global batch 8"):
        ResumableShuffleSampler(50, num_replicas=2, rank=0, batch_size=4).resume_at(0, 12)


def test_sampler_refuses_a_rank_outside_the_world():
    with pytest.raises(ValueError, match=r"rank=2 must lie in \[0, num_replicas=2\)"):
        ResumableShuffleSampler(10, num_replicas=2, rank=2)


def test_lightning_keeps_the_sampler_under_ddp():
    """A DistributedSampler: Lightning does not wrap it in DistributedSamplerWrapper (which indexes past the end
    of a resumed sampler)."""
    from torch.utils.data import DistributedSampler

    assert isinstance(ResumableShuffleSampler(10, num_replicas=2, rank=0), DistributedSampler)


# ------------------------------------------------------------------------------------------ loss variants
def test_simple_loss_with_a_learned_variance_is_refused(tmp_path):
    cfg = compose_run([*TINY, "diffusion.var_type=learned_range", "diffusion.loss_type=simple"], tmp_path)
    message = (r"diffusion.loss_type=simple trains no variance head, but diffusion.var_type=learned_range learns "
               r"one: use diffusion.loss_type=hybrid")
    with pytest.raises(ValueError, match=message):
        train(cfg)


def test_a_time_budgeted_lr_decay_steps_every_rank_with_the_same_lr(tmp_path):
    """Under trainer.max_time (no max_steps) a decaying LR follows the time spent, read every batch: rank 0's
    clock is broadcast, so the replicas (whose clocks differ: rank 1's runs 0.1% fast here) apply the same LR and
    stay bit-identical. The Timer's clock is driven (tests/clock.py): 10 s per batch of a 10-minute budget."""
    run = [o for o in RUN if not o.startswith("trainer.max_steps")]
    result = _run([*run, *DDP, "trainer.max_steps=-1", "trainer.max_epochs=2", "trainer.max_time=00:00:10:00",
                   "optim.lr_schedule=linear", "optim.warmup_steps=0", "+callbacks.clock._target_=clock.StepClock",
                   "+callbacks.clock.seconds_per_batch=10", "+callbacks.clock.rank_skew=0.001",
                   "+callbacks.draws._target_=faults.DrawRecorder", f"+callbacks.draws.path={tmp_path / 'draws'}"],
                  tmp_path / "run")
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"draws.rank{r}.pt", weights_only=True) for r in (0, 1)]
    for key in ranks[0]["weights"]:
        assert torch.equal(ranks[0]["weights"][key], ranks[1]["weights"][key]), key
    # step s is taken in the n-th micro-batch (accumulation 2, 5 batches an epoch): the LR it leaves is decayed by
    # rank 0's n x 10 s of the 600 s, not by the steps (the run has no step horizon)
    batches = {1: 2, 2: 4, 3: 5, 4: 7, 5: 9, 6: 10}
    for step, n in batches.items():
        lr = torch.load(_ckpt(tmp_path / "run", step), weights_only=True)["lr_schedulers"][0]["_last_lr"][0]
        assert lr == pytest.approx(2e-4 * (1 - n * 10 / 600), rel=1e-9, abs=0), (step, lr)
