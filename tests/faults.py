"""Fault injection for the crash tests: callbacks added to a run with ``+callbacks.<name>._target_=faults.X``.

They live outside ``ddpm_lightning``, so runs that use them set ``allow_any_target=true`` (and put ``tests/``
on ``PYTHONPATH`` when run as a subprocess).
"""

from __future__ import annotations

import io
import os
import signal
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import torch


def sigkill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


class LossRecorder(pl.Callback):
    """Appends ``step loss`` lines to ``path`` after every optimizer step (flushed: a kill loses nothing).

    Runs before the checkpoint callbacks (Lightning orders those last), so a step inside a checkpoint is
    always recorded; a resumed run re-records the steps after its checkpoint (keep the last value per step).
    """

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        with open(self.path, "a") as handle:
            handle.write(f"{trainer.global_step} {float(loss)!r}\n")
            handle.flush()


def read_loss_curve(path: str | Path) -> dict[int, float]:
    curve: dict[int, float] = {}
    for line in Path(path).read_text().splitlines():
        step, loss = line.split()
        curve[int(step)] = float(loss)
    return curve


def write_half(save, obj, f) -> None:
    """Write the first half of ``obj``'s checkpoint bytes to ``f`` (a path or a file object), flushed to disk."""
    buffer = io.BytesIO()
    save(obj, buffer)
    data = buffer.getvalue()[: len(buffer.getvalue()) // 2]
    if hasattr(f, "write"):
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
        return
    with open(f, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def interrupt_torch_save(trainer, step: int, match: str, interrupt) -> None:
    """Patch ``torch.save``: at global step ``step``, the first save to a file whose name contains ``match``
    writes half of its bytes, then calls ``interrupt`` (a SIGKILL, a pause for a signal)."""
    original = torch.save

    def save(obj, f, *args, **kwargs):
        if trainer.global_step == step and match in str(getattr(f, "name", f)):
            write_half(original, obj, f)
            interrupt()
        return original(obj, f, *args, **kwargs)

    torch.save = save


class KillAt(pl.Callback):
    """SIGKILL the process at global step ``step``.

    ``phase``: ``"train"`` after the optimizer step (before that step's checkpoints), ``"val"`` in the middle of
    validation, ``"save"`` halfway through writing the first checkpoint file at that step whose name contains
    ``match`` (the first half of the bytes reach the disk, then the process dies), ``"score"`` while generated
    samples are scored at that step for the ``occurrence``-th time (at ``max_steps``: 1 is the in-loop score of
    the last validation, 2 the final score after training).
    """

    def __init__(self, step: int, phase: str = "train", match: str = "", occurrence: int = 1) -> None:
        if phase not in ("train", "val", "save", "score"):
            raise ValueError(f"phase={phase!r}; allowed: train, val, save, score")
        self.step, self.phase, self.match = int(step), phase, match
        self.occurrence, self._seen = int(occurrence), 0  # "score": the n-th scoring at that step

    def setup(self, trainer, pl_module, stage: str) -> None:
        self.trainer = trainer
        if self.phase == "score":  # inside the scoring of generated samples (in-loop, or final at max_steps)
            from ddpm_lightning.metrics.generative import GenerativeMetrics

            score = GenerativeMetrics.score

            def killing_score(metrics, *args, **kwargs):
                if trainer.global_step == self.step:
                    self._seen += 1
                    if self._seen == self.occurrence:
                        sigkill_self()
                return score(metrics, *args, **kwargs)

            GenerativeMetrics.score = killing_score
            return
        if self.phase != "save":
            return
        interrupt_torch_save(trainer, self.step, self.match, sigkill_self)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.phase == "train" and trainer.global_step == self.step:
            sigkill_self()

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if self.phase == "val" and trainer.global_step == self.step:
            sigkill_self()


class NaNLossAt(pl.Callback):
    """Turns the training loss into NaN at the given global steps (1-based, as logged) by poisoning the batch."""

    def __init__(self, steps: list[int]) -> None:
        self.steps = {int(s) for s in steps}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step + 1 in self.steps:
            batch[0].fill_(float("nan"))


# ------------------------------------------------------------------------------------ running and comparing
TESTS_DIR = Path(__file__).resolve().parent


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment for ``python -m ddpm_lightning.train`` subprocesses: offline W&B, faults importable,
    one intra-op thread."""
    env = {**os.environ, "WANDB_MODE": "offline", "HYDRA_FULL_ERROR": "0", "OMP_NUM_THREADS": "1", **extra}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(TESTS_DIR), env.get("PYTHONPATH", "")) if p)
    return env


def train_command(overrides: list[str], run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "ddpm_lightning.train", *overrides, f"hydra.run.dir={run_dir}"]


def assert_same_training(ckpt_a: str | Path, ckpt_b: str | Path, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    """Two checkpoints hold the same training state: step, weights + EMA, AdamW moments, sampler, RNG."""
    a = torch.load(ckpt_a, map_location="cpu", weights_only=True)
    b = torch.load(ckpt_b, map_location="cpu", weights_only=True)
    assert a["global_step"] == b["global_step"], (a["global_step"], b["global_step"])
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key, value in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][key], value, rtol=rtol, atol=atol, msg=key)
    state_a, state_b = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    assert state_a.keys() == state_b.keys()
    for index, moments in state_a.items():
        for name, value in moments.items():
            torch.testing.assert_close(state_b[index][name], value, rtol=rtol, atol=atol, msg=f"{index}.{name}")
    for name, value in a.get("timestep_sampler", {}).items():
        torch.testing.assert_close(b["timestep_sampler"][name], value, msg=name)
    assert torch.equal(a["rng_states"]["torch"], b["rng_states"]["torch"]), "torch RNG state differs"


def assert_same_curve(reference: dict[int, float], resumed: dict[int, float], rtol: float = 1e-5) -> None:
    assert sorted(resumed) == sorted(reference), (sorted(reference), sorted(resumed))
    torch.testing.assert_close(torch.tensor([resumed[s] for s in sorted(reference)]),
                               torch.tensor([reference[s] for s in sorted(reference)]), rtol=rtol, atol=1e-6)


class StopAt(pl.Callback):
    """Stops the run cleanly after optimizer step ``step`` (after its checkpoints): an interruption that keeps
    the run's config (``trainer.max_steps``) unchanged, in-process."""

    def __init__(self, step: int) -> None:
        self.step = int(step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            trainer.should_stop = True


class InterruptAt(pl.Callback):
    """Raises KeyboardInterrupt (what Ctrl-C does) after global step ``step``."""

    def __init__(self, step: int) -> None:
        self.step = int(step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise KeyboardInterrupt
class DrawRecorder(pl.Callback):
    """Records this rank's training draws (t, the noise) and, at the end, its weights: ``<path>.rank<r>.pt``."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self.draws: list[dict] = []

    def setup(self, trainer, pl_module, stage: str) -> None:
        self.initial = {k: v.detach().cpu().clone() for k, v in pl_module.net.state_dict().items()}  # before DDP
        diffusion, original = pl_module.diffusion, pl_module.diffusion.q_sample

        def q_sample(x_start, t, noise=None):
            if torch.is_grad_enabled():  # training steps (validation runs under no_grad)
                self.draws.append({"step": trainer.global_step, "t": t.detach().cpu().clone(),
                                   "noise": noise.detach().cpu().clone()})
            return original(x_start, t, noise=noise)

        diffusion.q_sample = q_sample

    def on_train_end(self, trainer, pl_module) -> None:
        weights = {k: v.detach().cpu().clone() for k, v in pl_module.net.state_dict().items()}
        torch.save({"draws": self.draws, "weights": weights, "initial": self.initial},
                   f"{self.path}.rank{trainer.global_rank}.pt")


class PauseAt(pl.Callback):
    """Writes ``marker`` and then waits (in Python, up to ``seconds``) at global step ``step`` in ``phase``:
    ``"train"`` (after the optimizer step), ``"val"`` (in a validation batch), ``"final"`` (``on_train_end``,
    where the end-of-training scoring runs) or ``"save"`` (halfway through writing a checkpoint file whose
    name contains ``match``). A test sends a signal once the marker exists. ``until``: a signal name (``SIGUSR1``)
    whose arrival ends the wait (passed on to the handler the run installed), so the signal lands inside the pause
    however slowly the test process gets to send it; ``seconds`` is then only a hang guard."""

    def __init__(self, step: int, phase: str, marker: str, seconds: float = 120.0, match: str = "",
                 rank: int | None = None, until: str | None = None) -> None:
        if phase not in ("train", "val", "final", "save"):
            raise ValueError(f"phase={phase!r}; allowed: train, val, final, save")
        self.step, self.phase, self.marker, self.seconds, self.match = int(step), phase, Path(marker), seconds, match
        self.rank = rank  # None: every rank pauses; else only this one (the others go on, into the next collective)
        self.until = None if until is None else getattr(signal, until)
        self.paused = False
        self.trainer = None

    def _pause(self) -> None:
        if self.paused or (self.rank is not None and self.trainer.global_rank != self.rank):
            return
        self.paused = True
        received: list[int] = []
        if self.until is not None:  # before the marker: the test may signal as soon as it exists
            handler = signal.getsignal(self.until)

            def note(signum, frame):
                received.append(signum)
                if callable(handler):
                    handler(signum, frame)

            signal.signal(self.until, note)
        try:
            self.marker.write_text("paused\n")
            deadline = time.monotonic() + self.seconds
            while not received and time.monotonic() < deadline:
                time.sleep(0.05)
        finally:
            if self.until is not None:
                signal.signal(self.until, handler)

    def setup(self, trainer, pl_module, stage: str) -> None:
        self.trainer = trainer
        if self.phase != "save":
            return
        interrupt_torch_save(trainer, self.step, self.match, self._pause)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.phase == "train" and trainer.global_step == self.step:
            self._pause()

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if self.phase == "val" and trainer.global_step == self.step:
            self._pause()

    def on_train_end(self, trainer, pl_module) -> None:
        if self.phase == "final" and trainer.global_step == self.step:
            self._pause()
