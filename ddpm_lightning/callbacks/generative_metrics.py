"""FID / KID / precision-recall / classifier-IS of EMA samples during validation (and at the end of training).

Real-data statistics are computed once per (data set, split, size, extractor, n) and cached on disk, so a
sweep pays for them once. Metric names carry the sample count (``val/fid@500``) so nobody mistakes an
in-loop FID for a 50k FID.
"""

from __future__ import annotations

import dataclasses
import random
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from .. import artifacts
from ..config.choices import POOL_DIMS
from ..config.schema import GuidanceConfig, SampleConfig
from ..metrics import GenerativeMetrics, make_generative_metrics, metric_name, to_uint8
from ..metrics.progress import ProgressLines
from ..metrics.scores import fid_infinity_min_samples
from ..modules.guidance import guidance_config, load_guidance
from ..provenance import provenance
from ..sampling import Guidance, resolve_sampler
from .reproduce import checkpoint_at_step, eval_command

# the callback's guidance keys before the ``guidance`` group (run configs saved earlier hold them): new names
LEGACY_GUIDANCE_KEYS = {"classifier_ckpt": "classifier_ckpt", "classifier_scale": "scale", "cfg_scale": "cfg_scale"}


class GenerativeMetricsCallback(pl.Callback):
    """Every ``every_n_val_epochs`` validations (and/or at the end of training) sample ``num_samples`` images
    with the EMA weights and log ``val/<metric>@<n>`` to every logger; ModelCheckpoint can monitor them.
    ``in_loop_num_samples`` (default: ``num_samples``) makes the in-loop scores cheaper than the final ones:
    e.g. ``val/fid@100`` during training, ``val/fid@500`` at the end. ``metrics`` as ``GenerativeMetrics``
    (``sfid`` included); ``reference_n``/``pr_reference_n``/``reference`` as ``make_generative_metrics``.
    ``method``/``steps``/``eta`` override the run's own sampler settings (``sample:``; None keeps them,
    ``steps="all"``: every one of the T steps), resolved once when training starts (``sampling.resolve_sampler``).

    Every rank samples and featurises its share of the indices (per-sample seeds: the images do not depend on
    the number of ranks), the features are gathered to rank 0, which scores them; the numbers are broadcast
    so every rank logs the same values. ``guidance``: the ``guidance`` group of ``ddpm-eval`` (``GuidanceConfig``:
    ``classifier_ckpt`` + ``scale`` for a noisy classifier, checked against the model's process when training
    starts, and/or ``cfg_scale``). The keys of run configs saved before that group (``classifier_ckpt``,
    ``classifier_scale``, ``cfg_scale``) are read as its ``classifier_ckpt``, ``scale`` and ``cfg_scale``.
    """

    def __init__(self, num_samples: int = 500, every_n_val_epochs: int = 0, on_train_end: bool = True,
                 metrics: Sequence[str] = ("fid", "kid", "pr"), feature: str = "inception",
                 weights_path: str | None = None, reference_split: str = "train", reference_n: int = 2000,
                 cache_dir: str | None = None, classifier_epochs: int = 5, method: str | None = None,
                 steps: int | str | None = None, eta: float | None = None,
                 guidance: GuidanceConfig | Mapping[str, Any] | None = None, batch_size: int = 64,
                 seed: int = 1234, progress: bool = False, in_loop_num_samples: int | None = None,
                 pr_reference_n: int = 10_000, reference: str | None = None, **legacy: Any) -> None:
        if num_samples < 2:
            raise ValueError(f"num_samples must be >= 2 for FID, got {num_samples}")
        self.num_samples = int(num_samples)
        self.in_loop_num_samples = int(in_loop_num_samples or num_samples)
        if self.in_loop_num_samples < 2:
            raise ValueError(f"in_loop_num_samples must be >= 2 for FID, got {in_loop_num_samples}")
        needed = fid_infinity_min_samples(POOL_DIMS.get(feature, 0))
        if "fid_inf" in metrics and min(self.num_samples, self.in_loop_num_samples) < needed:
            raise ValueError(f"metrics fid_inf needs num_samples and in_loop_num_samples >= {needed} with feature="
                             f"{feature} (subsets down to a fifth of the samples, each at least the feature size): "
                             f"raise them or drop fid_inf")
        self.every_n_val_epochs = int(every_n_val_epochs)
        self.at_train_end = bool(on_train_end)
        self.metric_kwargs = dict(metrics=tuple(metrics), feature=feature, weights_path=weights_path,
                                  reference_split=reference_split, reference_n=reference_n,
                                  pr_reference_n=pr_reference_n, reference=reference, cache_dir=cache_dir,
                                  classifier_epochs=classifier_epochs, batch_size=batch_size)
        self.overrides = {"method": method, "steps": steps, "eta": eta, "batch_size": batch_size}
        resolve_sampler(None, {"method": method})  # an unknown method fails here, the rest with the run's own
        self.settings: SampleConfig | None = None  # resolved against the run's own settings when training starts
        self.seed = seed
        self.guidance_config = _with_legacy_keys(guidance_config(guidance), legacy)
        self._guidance: Guidance | None = None  # loaded once, when training starts
        self._scorer: GenerativeMetrics | None = None
        self._val_count = 0
        self._seconds_per_sample: float | None = None  # timed at fit start (scoring_estimate)
        self.last_results: dict[str, float] = {}

    def _prepare(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        if self.settings is None:
            self.settings = resolve_sampler(module.sample_settings, self.overrides)
        if self._guidance is None:  # a missing or mismatched classifier fails here, before any training
            self._guidance = load_guidance(self.guidance_config, module)
        if self._scorer is None:
            # outside Lightning's inference mode: the clean classifier (is_clf) may need training once
            with torch.inference_mode(False), torch.enable_grad():
                self._scorer = make_generative_metrics(trainer.datamodule, device=module.device,
                                                       progress=trainer.progress_bar_callback is not None,
                                                       log=rank_zero_info, rank=trainer.global_rank,
                                                       world_size=trainer.world_size, **self.metric_kwargs)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Reference statistics and the clean classifier before training, on every rank at once (the ranks share
        the reference feature pass; rank 0 trains the clean classifier, the others read its cache): bad
        settings fail early. Then one network call and one feature pass on a few samples are timed, so the
        training's time estimate covers the scores (``scoring_estimate``)."""
        with _global_rng_untouched():  # a resumed run's restored random state stays as saved
            self._prepare(trainer, pl_module)
            if self.every_n_val_epochs or self.at_train_end:
                self._seconds_per_sample = self._time_one_sample(trainer, pl_module)

    def _time_one_sample(self, trainer: pl.Trainer, module: pl.LightningModule) -> float | None:
        """Seconds per sample of scoring (every network call of the sampler + the features), timed on a batch of
        up to 8 after a warm-up on a batch of the same size (lazy initialisation, kernel selection, and under
        ``model.compile`` the graph for that shape: a warm-up at another size left the recompile inside the timed
        call, and the estimate read ~900 min); None where the module cannot say its network calls."""
        if not callable(getattr(module, "sampling_process", None)):
            return None
        calls = int(module.sampling_process(self.settings).num_timesteps)
        probe = dataclasses.replace(self.settings, method="ddim", steps=2, eta=0.0, schedule="adm")
        calls_timed = int(module.sampling_process(probe).num_timesteps)  # the fewest a respaced process keeps
        n = min(self.settings.batch_size, 8)
        timings = []
        for size in (n, n):  # the first: warm-up at the timed size, not counted
            start = time.perf_counter()
            with torch.no_grad(), trainer.precision_plugin.forward_context():
                images, _ = module.sample(size, probe, guidance=self._guidance, y="random", seed=self.seed,
                                          first_index=0)
            sampled = time.perf_counter()
            self._scorer.outputs(to_uint8(images))
            timings.append(((sampled - start) / calls_timed * calls + time.perf_counter() - sampled) / size)
        return timings[-1]

    def scoring_estimate(self, trainer: pl.Trainer) -> tuple[float, str] | None:
        """(seconds, what) of the scores this run will still compute: in-loop scores at the validations left
        (``trainer.max_steps`` / ``val_check_interval``) and the final one; None when not timed."""
        per_sample = getattr(self, "_seconds_per_sample", None)
        if per_sample is None:
            return None
        scores = []
        interval, total = trainer.val_check_interval, trainer.max_steps
        if self.every_n_val_epochs and isinstance(interval, int) and interval > 0 and total and total > 0 \
                and trainer.check_val_every_n_epoch is None:
            validations = total // interval - trainer.global_step // interval
            in_loop = sum(1 for k in range(1, validations + 1) if (self._val_count + k) % self.every_n_val_epochs == 0)
            if in_loop:
                scores.append((in_loop, self.in_loop_num_samples, "in the loop"))
        if self.at_train_end:
            scores.append((1, self.num_samples, "at the end"))
        if not scores:
            return None
        samples = sum(count * n for count, n, _ in scores)
        name = self.metric_kwargs["metrics"][0] if self.metric_kwargs["metrics"] else "score"
        what = " and ".join(f"{count} x {name.upper()}@{n} {where}" if count > 1 else f"{name.upper()}@{n} {where}"
                            for count, n, where in scores)
        return per_sample * samples / max(trainer.world_size, 1), f"{what}: {samples} samples"

    def _scores(self, trainer: pl.Trainer, module: pl.LightningModule, num_samples: int) -> dict[str, float] | None:
        """Every rank samples and featurises its own index range (per-sample seeds: the same images as one
        process); the features (not the images) are gathered and rank 0 scores them in index order."""
        self._prepare(trainer, module)
        start = time.perf_counter()
        y = self._labels(module)
        rank, world = trainer.global_rank, trainer.world_size
        per_rank = -(-num_samples // world)
        first, last = min(rank * per_rank, num_samples), min((rank + 1) * per_rank, num_samples)
        parts = []
        batch = self.settings.batch_size
        name = ", ".join(self.metric_kwargs["metrics"])
        what = f"scoring {name} @{num_samples}" + (f" (rank 0 of {world})" if world > 1 else "")
        rank_zero_info(f"{what}: sampling {last - first} images in batches of <= {batch}, each with its features; "
                       f"the estimate follows the first batch")
        progress = ProgressLines(last - first, what, rank_zero_info)
        for index in range(first, last, batch):
            n = min(batch, last - index)
            with trainer.precision_plugin.forward_context():  # training precision (bf16: 1.8x, same FID)
                images, _ = module.sample(n, self.settings, guidance=self._guidance, y=y, seed=self.seed,
                                          first_index=index)
            parts.append(self._scorer.outputs(to_uint8(images)))
            progress.update(n)
        sampled = time.perf_counter()
        if world > 1:
            gathered: list[Any] = [None] * world
            torch.distributed.all_gather_object(gathered, parts)
            parts = [part for rank_parts in gathered for part in rank_parts]
        if rank != 0:
            return None
        scores = self._scorer.score(parts)
        rank_zero_info(f"generative metrics @{num_samples}: {scores} (sampling + features {sampled - start:.0f} s "
                       f"on {world} process(es), scoring {time.perf_counter() - sampled:.0f} s)")
        return scores

    def _evaluate(self, trainer: pl.Trainer, module: pl.LightningModule, log: bool,
                  num_samples: int) -> dict[str, float]:
        with _global_rng_untouched():  # scoring observes training: a resumed run must not see other random numbers
            scores = self._scores(trainer, module, num_samples)
        scores = trainer.strategy.broadcast(scores, src=0)
        named = {f"val/{metric_name(key, num_samples)}": float(value) for key, value in scores.items()}
        self.last_results = named
        if log:
            for key, value in named.items():
                module.log(key, value, on_step=False, on_epoch=True, sync_dist=False)
        return named

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"val_count": self._val_count}  # in-loop scores stay on the same validations after a resume

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._val_count = int(state_dict.get("val_count", 0))

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or not self.every_n_val_epochs:
            return
        self._val_count += 1
        if self._val_count % self.every_n_val_epochs == 0:
            self._evaluate(trainer, pl_module, log=True, num_samples=self.in_loop_num_samples)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.at_train_end:
            return
        named = self._evaluate(trainer, pl_module, log=False, num_samples=self.num_samples)
        for logger in trainer.loggers:  # self.log is not allowed here: write to the loggers directly
            logger.log_metrics(named, step=trainer.global_step)
            logger.save()
        ckpt = checkpoint_at_step(trainer)  # the weights just scored, on disk under a name (every rank: a save)
        if trainer.is_global_zero:
            artifacts.write_json(Path(trainer.default_root_dir) / artifacts.METRICS_FILE,
                                 {"global_step": trainer.global_step, "num_samples": self.num_samples, **named,
                                  "provenance": provenance(precision=trainer.precision, world_size=trainer.world_size),
                                  "ckpt": str(ckpt), "reproduce": self.reproduce_command(trainer, pl_module, ckpt)})

    def reproduce_command(self, trainer: pl.Trainer, module: pl.LightningModule, ckpt: Path) -> str | None:
        """The ``ddpm-eval`` command that gives the end-of-training scores again from ``ckpt`` (``reproduce``)."""
        return eval_command(ckpt, num_samples=self.num_samples, seed=self.seed, labels=self._labels(module),
                            precision=str(trainer.precision), settings=self.settings,
                            guidance=self.guidance_config, device=module.device.type,
                            scorer={**self.metric_kwargs, "metrics": list(self.metric_kwargs["metrics"])})

    def _labels(self, module: pl.LightningModule) -> str:
        """``balanced`` for a class-conditional model or classifier guidance (labels 0..K-1 in turn), else
        ``random`` (unused)."""
        return "balanced" if getattr(module, "num_classes", None) or self._guidance.cond_fn is not None else "random"


@contextmanager
def _global_rng_untouched() -> Iterator[None]:
    """Restore the global torch (CPU and CUDA), numpy and Python random states afterwards (KID subsets, ... draw
    from them), so that training after a score draws the numbers it would have drawn without it."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=range(torch.cuda.device_count()) if torch.cuda.is_initialized() else []):
        yield
    random.setstate(python_state)
    np.random.set_state(numpy_state)


def _with_legacy_keys(guidance: GuidanceConfig, legacy: Mapping[str, Any]) -> GuidanceConfig:
    """``guidance`` with the callback's keys from before the ``guidance`` group mapped in (silently: every run
    config saved earlier holds them); any other key is refused as an unknown argument."""
    unknown = sorted(set(legacy) - set(LEGACY_GUIDANCE_KEYS))
    if unknown:
        raise TypeError(f"GenerativeMetricsCallback got an unexpected keyword argument {unknown[0]!r}")
    given = {LEGACY_GUIDANCE_KEYS[key]: value for key, value in legacy.items() if value is not None}
    return dataclasses.replace(guidance, **given) if given else guidance
