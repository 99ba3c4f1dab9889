"""The ``ddpm-eval`` command line that reproduces the metric callback's end-of-training scores (``reproduce`` in
the run's ``metrics.json``): the checkpoint saved at the scored step, and every setting the callback sampled and
scored with pinned as a ``ddpm-eval`` key (seed, labels, sample count, sampler, batch, precision, reference
statistics, feature extractor, guidance). Running it gives the same numbers in its ``results.json``
(``tests/test_reproduce_in_loop.py``: 1e-4 relative).
"""

from __future__ import annotations

import dataclasses
import shlex
from pathlib import Path
from typing import Any

import lightning.pytorch as pl

from ..config.choices import ETA_METHODS
from ..config.schema import GuidanceConfig, SampleConfig
from ..modules.checkpoint import checkpoint_step

# the trainer's precision -> ddpm-eval's precision= (the same autocast around the sampler); others: no command
EVAL_PRECISION = {"32-true": "32", "32": "32", "bf16-mixed": "bf16"}
# the metric callback's scoring keys, under the same names in ddpm-eval
SCORER_KEYS = ("metrics", "feature", "weights_path", "reference_split", "reference_n", "pr_reference_n",
               "reference", "cache_dir", "classifier_epochs")


def hydra_value(value: Any) -> str:
    """``value`` as a Hydra command-line value: null, true/false, [a,b], numbers and strings as they are."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return "[" + ",".join(hydra_value(v) for v in value) + "]"
    return str(value)


def checkpoint_at_step(trainer: pl.Trainer) -> Path:
    """A checkpoint holding the weights of ``trainer.global_step``: one the run's ModelCheckpoints saved at that
    step (a step-named file before ``last.ckpt``, which a later resume overwrites), else one saved now as
    ``<checkpoints>/scored-step<N>.ckpt``. Every rank calls it (the save is collective)."""
    path = None
    if trainer.is_global_zero:
        path = _saved_at_step(trainer)
    path = trainer.strategy.broadcast(path, src=0)
    if path is None:
        folder = next((Path(cb.dirpath) for cb in trainer.checkpoint_callbacks if getattr(cb, "dirpath", None)),
                      Path(trainer.default_root_dir) / "checkpoints")
        path = str(folder / f"scored-step{trainer.global_step:07d}.ckpt")
        trainer.save_checkpoint(path, weights_only=False)  # a whole training checkpoint (said, not logged)
    return Path(path).resolve()


def _saved_at_step(trainer: pl.Trainer) -> str | None:
    named, last = [], []
    for callback in trainer.checkpoint_callbacks:
        for path in (*getattr(callback, "best_k_models", {}), getattr(callback, "best_model_path", "")):
            named.append(path)
        last.append(getattr(callback, "last_model_path", ""))
    for path in dict.fromkeys([*named, *last]):
        if path and Path(path).is_file() and checkpoint_step(path) == trainer.global_step:
            return str(path)
    return None


def eval_command(ckpt: Path, *, num_samples: int, seed: int, labels: str, precision: str, settings: SampleConfig,
                 guidance: GuidanceConfig, scorer: dict[str, Any], device: str) -> str | None:
    """The ``ddpm-eval`` command (one string, shell-quoted) that samples and scores as the callback did; None for
    a trainer precision ddpm-eval has no setting for (16-mixed, bf16-true, 64-true)."""
    if precision not in EVAL_PRECISION:
        return None
    steps = "all" if settings.steps is None else settings.steps
    keys = {"ckpt": str(ckpt), "num_samples": num_samples, "seed": seed, "y": labels,
            "precision": EVAL_PRECISION[precision], "method": settings.method, "steps": steps,
            **({"eta": settings.eta} if settings.method in ETA_METHODS else {}),  # ddpm-eval refuses it for others
            "schedule": settings.schedule, "clip_denoised": settings.clip_denoised, "batch_size": settings.batch_size,
            **{key: scorer[key] for key in SCORER_KEYS if key != "cache_dir" or scorer.get(key) is not None},
            "device": device}
    default = GuidanceConfig()
    keys.update({f"guidance.{f.name}": getattr(guidance, f.name) for f in dataclasses.fields(guidance)
                 if getattr(guidance, f.name) != getattr(default, f.name)})
    return shlex.join(["ddpm-eval", *(f"{key}={hydra_value(value)}" for key, value in keys.items())])
