"""Every choice list of the package, defined once, with no import beyond the standard library.

The library (``diffusion``, ``sampling``, ``metrics``, ``data``, ``modules``, ``loggers``) and the config checks
that run before torch is imported (``cli/validate.py``) both read these names, so an option is added in one place
and a typo is answered in one line before any heavy import. ``CHOICE_KEYS`` maps each choice-valued key of the
configs to its list; ``INT_KEYS`` / ``FLOAT_RANGES`` are the numeric keys checked before a run starts (a test
composes every config and fails when one of these keys no longer exists, so a renamed key cannot drop its check).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

# ------------------------------------------------------------------------------------------------ diffusion
BETA_SCHEDULES = ("linear", "cosine")
MEAN_TYPES = ("eps", "x0", "v")
VAR_TYPES = ("fixed_small", "fixed_large", "learned", "learned_range")
LOSS_TYPES = ("simple", "hybrid", "vlb")
LOSS_WEIGHTINGS = ("none", "min_snr", "p2")
TIMESTEP_SAMPLERS = ("uniform", "loss-second-moment")
LR_SCHEDULES = ("constant", "cosine", "linear")
OBJECTIVES = ("diffusion", "classifier")

# ------------------------------------------------------------------------------------------------- sampling
SAMPLE_METHODS = ("ddpm", "ddim", "dpm++2m", "dpm++3m", "dpm++2m-sde", "unipc")
ETA_METHODS = ("ddim",)  # the samplers that take eta (DDIM's stochasticity); the others refuse it
SOLVER_SCHEDULES = ("uniform", "logsnr", "karras", "trailing")  # the step schedules any method can walk
SAMPLE_SCHEDULES = ("adm",) + SOLVER_SCHEDULES  # adm: ADM's space_timesteps respacing
CORRECTORS = ("none", "unipc")
LABEL_MODES = ("random", "balanced")  # or a class index
PRECISIONS = ("32", "bf16")  # ddpm-sample / ddpm-eval (the trainer's are Lightning's)
DEVICES = ("auto", "cpu", "cuda", "cuda:N", "mps")
# guidance (config.schema.GuidanceConfig): how a guidance strength varies with the original step t
# (diffusion/guidance_schedule.py); constant: the same at every step, linear: strength x t / (T - 1), rising with t
GUIDANCE_SCALE_SCHEDULES = ("constant", "linear")
# what guides a row of a guidance sweep (``ddpm-report --select-per guidance``), "+interval" appended when
# guidance.interval / guidance.interval_sigma restricts it to a band of steps
GUIDANCE_METHODS = ("unguided", "classifier", "cfg", "autoguidance")

# -------------------------------------------------------------------------------------------------- metrics
FEATURE_EXTRACTORS = ("inception", "tiny")
POOL_DIMS = {"inception": 2048, "tiny": 64}  # the pooled (FID) feature size of each extractor
MAX_SIGMA_REL = math.sqrt(1.0 / 12.0)  # post-hoc EMA: gamma = 0, the uniform average of every step


@dataclass(frozen=True)
class Metric:
    """One generative metric: the name users ask for (``metrics=[...]``), the keys its score writes (without
    the ``stage/`` prefix and ``@n``), which way is better, and how tables show it."""

    name: str
    outputs: tuple[str, ...]
    higher_is_better: bool
    display: tuple[str, ...]


METRIC_TABLE = (
    Metric("fid", ("fid",), False, ("FID",)),
    Metric("fid_inf", ("fid_inf",), False, ("FID-inf",)),
    Metric("sfid", ("sfid",), False, ("sFID",)),
    Metric("kid", ("kid_mean", "kid_std"), False, ("KID", "KID std")),
    Metric("pr", ("precision", "recall"), True, ("Prec", "Rec")),
    Metric("is", ("is_mean", "is_std"), True, ("IS", "IS std")),
    Metric("is_clf", ("is_clf_mean", "is_clf_std"), True, ("IS_clf", "IS_clf std")),
)
METRICS = tuple(m.name for m in METRIC_TABLE)  # what GenerativeMetrics computes
EVAL_METRICS = METRICS + ("nll",)  # ddpm-eval also computes the exact NLL

# every score key a report may rank, with its direction: the metrics' outputs plus the losses and likelihoods
# the modules log (a name not listed ranks lower-is-better, as losses do)
HIGHER_IS_BETTER = tuple(out for m in METRIC_TABLE if m.higher_is_better for out in m.outputs
                         if not out.endswith("_std")) + ("is", "acc", "accuracy", "class_accuracy")
LOWER_IS_BETTER = tuple(out for m in METRIC_TABLE if not m.higher_is_better for out in m.outputs
                        if not out.endswith("_std")) + ("vlb_bpd", "nll_bpd", "bpd", "loss")
DISPLAY_NAMES = {out: shown for m in METRIC_TABLE for out, shown in zip(m.outputs, m.display, strict=True)} | {
    "class_accuracy": "Acc", "vlb_bpd": "NLL bpd", "nll_bpd": "NLL bpd (exact)"}

# ----------------------------------------------------------------------------------------------------- data
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
FIT_METHODS = ("pad", "resize")
REFERENCE_SPLITS = ("train", "val")  # the data split behind the reference statistics
IMAGE_MODES = ("RGB", "L")
ON_BAD_IMAGE = ("error", "skip")  # an unreadable image in a folder: stop, or drop it with a warning

# -------------------------------------------------------------------------------------------------- logging
WANDB_MODES = ("online", "offline", "disabled")

# ---------------------------------------------------------------------------------- keys checked before runs
# key of the composed ddpm-train config -> its choices (checked before torch is imported)
CHOICE_KEYS: dict[str, tuple[str, ...]] = {
    "diffusion.schedule": BETA_SCHEDULES,
    "diffusion.mean_type": MEAN_TYPES,
    "diffusion.var_type": VAR_TYPES,
    "diffusion.loss_type": LOSS_TYPES,
    "diffusion.loss_weighting": LOSS_WEIGHTINGS,
    "train.timestep_sampler": TIMESTEP_SAMPLERS,
    "optim.lr_schedule": LR_SCHEDULES,
    "sample.method": SAMPLE_METHODS,
    "sample.schedule": SAMPLE_SCHEDULES,
    "objective": OBJECTIVES,
    "data.fit": FIT_METHODS,
    "data.mode": IMAGE_MODES,
    "data.on_bad_image": ON_BAD_IMAGE,
    "callbacks.sample_grid.method": SAMPLE_METHODS,
    "callbacks.generative_metrics.method": SAMPLE_METHODS,
    "callbacks.generative_metrics.feature": FEATURE_EXTRACTORS,
    "callbacks.generative_metrics.reference_split": REFERENCE_SPLITS,
}
# key of the composed ddpm-sample / ddpm-eval config -> its choices
GENERATION_CHOICE_KEYS: dict[str, tuple[str, ...]] = {
    "method": SAMPLE_METHODS,
    "schedule": SAMPLE_SCHEDULES,
    "feature": FEATURE_EXTRACTORS,
    "precision": PRECISIONS,
    "reference_split": REFERENCE_SPLITS,
    "guidance.scale_schedule": GUIDANCE_SCALE_SCHEDULES,
}

# key: (minimum, what else is allowed). Integers only; None in the extras: not set is fine.
INT_KEYS: dict[str, tuple[int, tuple[Any, ...]]] = {
    "seed": (0, ()),
    "trainer.max_steps": (1, (-1,)),
    "trainer.max_epochs": (1, (-1, None)),
    "trainer.min_epochs": (0, (None,)),
    "trainer.min_steps": (0, (None,)),
    "trainer.log_every_n_steps": (1, (None,)),
    "trainer.accumulate_grad_batches": (1, (None,)),
    "trainer.num_sanity_val_steps": (-1, (None,)),
    "trainer.check_val_every_n_epoch": (1, (None,)),
    "data.batch_size": (1, ()),
    "data.num_workers": (0, (None,)),
    "data.image_size": (4, ()),
    "data.limit": (1, (None,)),
    "optim.warmup_steps": (0, ()),
    "sample.batch_size": (1, ()),
    "train.max_nonfinite_steps": (1, (None,)),
    "callbacks.sample_grid.num_samples": (1, ()),
    "callbacks.sample_grid.per_class": (0, (None,)),
    "callbacks.sample_grid.every_n_steps": (0, (None,)),
    "callbacks.periodic_checkpoint.every_n_train_steps": (1, (None,)),
    "callbacks.periodic_checkpoint.save_top_k": (-1, ()),
    "callbacks.model_checkpoint.save_top_k": (-1, ()),
    "callbacks.generative_metrics.num_samples": (1, (None,)),
    "callbacks.generative_metrics.in_loop_num_samples": (0, (None,)),
    "callbacks.generative_metrics.batch_size": (1, (None,)),
    "callbacks.generative_metrics.reference_n": (1, (None,)),
}
# keys that are an integer count (>= minimum) or a fraction in (0, 1]
COUNT_OR_FRACTION_KEYS = {"trainer.val_check_interval": 1, "trainer.limit_val_batches": 0,
                          "trainer.limit_train_batches": 1}
# floats in [low, high)
FLOAT_RANGES = {"ema.decay": (0.0, 1.0), "train.p_uncond": (0.0, 1.0), "model.dropout": (0.0, 1.0)}
# ddpm-sample / ddpm-eval integer keys and their minimum
GENERATION_INTS = {"num_samples": 1, "batch_size": 1, "seed": 0, "nll_images": 1, "reference_n": 1,
                   "classifier_epochs": 1, "shard_size": 1, "devices": 1, "pr_reference_n": 1}
