"""Dataclass schemas for the run config: a wrong key or type fails before any work.

Groups whose implementation users swap (data, trainer, logger, callbacks, hydra launcher) are free-form
``_target_`` nodes; the rest are typed here. Allowed string values are checked where they are used
(GaussianDiffusion, samplers) with messages that list them; the two settings objects that travel whole to the
sampler (``SampleConfig``, ``GuidanceConfig``) check their own values when built. The defaults here are those
of the default composition (``conf/train.yaml``; ``tests/test_config_defaults.py`` keeps both equal). Plain
dataclasses with no import beyond the standard library (and the choice lists of ``choices.py``): the pure-torch
``sampling`` package takes its defaults from ``SampleConfig``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .choices import GUIDANCE_SCALE_SCHEDULES, SAMPLE_METHODS, SAMPLE_SCHEDULES


@dataclass
class ModelConfig:
    """ADM UNet flags (names as in OpenAI's code); image/channel/class sizes come from the data set."""

    model_channels: int = 64
    num_res_blocks: int = 2
    attention_resolutions: list[int] = field(default_factory=lambda: [16])
    dropout: float = 0.1
    channel_mult: list[int] = field(default_factory=lambda: [1, 2, 2])
    num_heads: int = 1
    num_head_channels: int = -1
    num_heads_upsample: int = -1
    use_scale_shift_norm: bool = False
    resblock_updown: bool = False
    use_new_attention_order: bool = False
    use_checkpoint: bool = False
    rescale_resblocks: bool = False
    class_cond: bool = False
    compile: bool = False
    channels_last: bool = False  # NHWC weights and activations (oneDNN / tensor-core friendly convolutions)


@dataclass
class DiffusionConfig:
    schedule: str = "linear"  # linear | cosine
    num_timesteps: int = 1000
    mean_type: str = "eps"  # eps | x0 | v
    var_type: str = "fixed_small"  # fixed_small | fixed_large | learned | learned_range
    loss_type: str = "simple"  # simple | hybrid | vlb
    hybrid_lambda: float = 0.001
    rescale_vlb: bool = False
    timestep_respacing: Any = None  # train on a respaced process (rare): "ddim50", "250", ...
    # training levers (diffusion/weighting.py, diffusion/noise_assignment.py); all off by default
    loss_weighting: str = "none"  # none | min_snr | p2 (the same x0-weighting for eps, x0 and v targets)
    min_snr_gamma: float = 5.0  # Min-SNR-gamma (Hang et al. 2023)
    p2_k: float = 1.0  # P2 (Choi et al. 2022): 1 / (k + SNR)^gamma on the eps loss
    p2_gamma: float = 1.0
    input_perturbation: float = 0.0  # DDPM-IP gamma (Ning et al. 2023: 0.1); 0 = off
    immiscible: bool = False  # immiscible diffusion (Li et al. 2024): batch noise assignment before q_sample


@dataclass
class OptimConfig:
    lr: float = 2e-4
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    warmup_steps: int = 100
    lr_schedule: str = "constant"  # after warm-up: constant | cosine | linear (decay to 0 at max_steps or max_time)
    fused: Any = None  # None: torch's default (foreach); true: fused kernel


@dataclass
class EMAConfig:
    decay: float = 0.9999
    warmup: bool = True  # decay_n = min(decay, (1 + n) / (10 + n))
    # post-hoc EMA (EDM2): power EMAs of these relative lengths, snapshots every N steps into <run>/posthoc_ema
    posthoc_sigma_rels: list[float] = field(default_factory=list)  # e.g. [0.05, 0.10]; empty = off
    posthoc_every_n_steps: int = 100  # aim for ~50 snapshots per run (fit error, conf/train.yaml)


@dataclass
class TrainConfig:
    timestep_sampler: str = "uniform"  # uniform | loss-second-moment
    p_uncond: float = 0.0  # label dropout for classifier-free guidance
    max_nonfinite_steps: int | None = 5  # stop after this many consecutive skipped non-finite steps (null: never)


@dataclass
class SampleConfig:
    """The sampler settings: one object under one name from the config to the loop. The run config's ``sample:``
    group (keys = these fields) is a run's own (``DiffusionModule.sample_settings``); a command resolves them
    once with its overrides (``sampling.resolve_sampler``: ``ddpm-sample``/``ddpm-eval``'s ``method``, ``steps``,
    ``eta``, ``schedule``, ..., the callbacks' ``method``/``steps``/``eta``) and passes the result down whole
    (``DiffusionModule.sample``, ``sample_images``). Checks its own values when built (allowed values named);
    ``steps`` against the process's T is checked by ``sampling.sampling_process``."""

    method: str = "ddim"  # ddpm | ddim | dpm++2m | dpm++3m | dpm++2m-sde | unipc
    steps: Any = 25  # network calls: int; with schedule=adm also "ddim25", "250", "10,15,20", or null for all T
    eta: float = 0.0  # DDIM only
    schedule: str = "adm"  # adm (ADM respacing) | uniform | logsnr | karras | trailing
    lower_order_final: bool = True  # DPM-Solver++/UniPC: lower orders for the last steps below 15 steps
    clip_denoised: bool = True
    batch_size: int = 64

    def __post_init__(self) -> None:
        if self.method not in SAMPLE_METHODS:
            raise ValueError(f"unknown sampling method {self.method!r}; allowed: {', '.join(SAMPLE_METHODS)}")
        if self.schedule not in SAMPLE_SCHEDULES:
            raise ValueError(f"unknown sampling schedule {self.schedule!r}; allowed: {', '.join(SAMPLE_SCHEDULES)}")
        if self.schedule != "adm" and (isinstance(self.steps, bool) or not isinstance(self.steps, int)):
            raise ValueError(f"schedule={self.schedule} needs an integer number of steps, got {self.steps!r}; section "
                             "strings such as 'ddim25' need schedule=adm")
        if isinstance(self.eta, bool) or not isinstance(self.eta, (int, float)) or not self.eta >= 0:
            raise ValueError(f"eta must be a number >= 0 (DDIM's stochasticity: 0 deterministic, 1 as DDPM), "
                             f"got {self.eta!r}")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {self.batch_size!r}")


@dataclass
class GuidanceConfig:
    """Guidance: one group with one spelling in ``ddpm-sample``, ``ddpm-eval``, the guidance sweeps and the metric
    callback (``callbacks.generative_metrics.guidance``). ``modules.guidance.load_guidance`` turns it into the
    sampler's ``sampling.Guidance`` (the loaded classifier's ``cond_fn``, the classifier-free scale, the guiding
    model of autoguidance, the schedule): a new kind of guidance is one more field here and one more part of that
    object. Checks its own values (the interval against the model's T when loaded).

    Every kind has a strength that is 0 when off: ``scale`` (classifier), ``cfg_scale`` (classifier-free) and
    ``autoguidance_scale - 1``. ``interval`` / ``interval_sigma`` and ``scale_schedule`` shape all of them along
    the trajectory (``diffusion.guidance_schedule``): outside the interval the step is the unguided one."""

    classifier_ckpt: Any = None  # a noisy classifier (ddpm-train experiment=classifier_default) or converted ADM one
    scale: float = 0.0  # classifier guidance s
    cfg_scale: float = 0.0  # classifier-free guidance w (models trained with train.p_uncond > 0)
    autoguidance_ckpt: Any = None  # autoguidance: a worse model of the same task (earlier checkpoint, smaller model)
    autoguidance_scale: float = 1.0  # w of eps_bad + w (eps_good - eps_bad); 1: the model alone (off)
    interval: Any = None  # [lo, hi]: guide only at original steps lo <= t <= hi (inclusive); null: every step
    interval_sigma: Any = None  # [lo, hi] in sigma = sqrt((1 - alpha_bar) / alpha_bar) (Kynkaanniemi et al.)
    scale_schedule: str = "constant"  # constant | linear (strength x t / (T - 1), rising with t)

    def __post_init__(self) -> None:
        for key in ("scale", "cfg_scale", "autoguidance_scale"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ValueError(f"guidance.{key} must be a number >= 0, got {value!r}")
        if self.scale_schedule not in GUIDANCE_SCALE_SCHEDULES:
            raise ValueError(f"unknown guidance.scale_schedule {self.scale_schedule!r}; allowed: "
                             f"{', '.join(GUIDANCE_SCALE_SCHEDULES)}")
        if self.interval is not None and self.interval_sigma is not None:
            raise ValueError("guidance.interval and guidance.interval_sigma both set: give the band of steps once "
                             "(interval in timesteps, interval_sigma in noise levels)")
        if self.interval is not None:
            self.interval = guidance_interval(self.interval, "guidance.interval", integer=True)
        if self.interval_sigma is not None:
            self.interval_sigma = guidance_interval(self.interval_sigma, "guidance.interval_sigma", integer=False)
        if self.autoguidance_scale != 1 and not self.autoguidance_ckpt:
            raise ValueError(f"guidance.autoguidance_scale={self.autoguidance_scale:g} needs the guiding model: give "
                             f"guidance.autoguidance_ckpt=<an earlier or smaller checkpoint of the same task>")
        if self.cfg_scale and self.autoguidance_ckpt and self.autoguidance_scale != 1:
            raise ValueError(f"guidance.cfg_scale={self.cfg_scale:g} and guidance.autoguidance_scale="
                             f"{self.autoguidance_scale:g} both guide, and their combination is not defined "
                             "(autoguidance replaces the unconditional model of classifier-free guidance by a worse "
                             "model): give one of them")


def guidance_interval(value: Any, key: str, integer: bool) -> list:
    """``value`` as ``[lo, hi]`` with 0 <= lo <= hi: integer timesteps (``integer``) or noise levels sigma; the
    upper end against the model's T is checked when the model is loaded. ValueError naming ``key`` otherwise."""
    what = ("two integer timesteps of the T-step process, 0 <= lo <= hi <= T-1" if integer
            else "two noise levels sigma = sqrt((1 - alpha_bar) / alpha_bar), 0 <= lo <= hi")
    try:
        items = None if isinstance(value, (str, bytes)) else list(value)
    except TypeError:
        items = None
    kinds = (int,) if integer else (int, float)
    if items is None or len(items) != 2 or any(isinstance(v, bool) or not isinstance(v, kinds) for v in items):
        raise ValueError(f"{key} must be [lo, hi], {what}; got {items if items is not None else value!r}")
    lo, hi = items
    if not (lo == lo and hi == hi):  # NaN
        raise ValueError(f"{key} must be [lo, hi], {what}; got {items!r}")
    if lo > hi:
        raise ValueError(f"{key}=[{lo}, {hi}] is reversed: give [lo, hi] with lo <= hi ({what})")
    if lo < 0:
        raise ValueError(f"{key}=[{lo}, {hi}] starts below 0: give [lo, hi], {what}")
    return [lo, hi]


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    data: Any = None
    trainer: Any = None
    logger: Any = None
    callbacks: Any = None
    paths: Any = None
    task_name: str = "train"
    tags: list[str] = field(default_factory=list)
    seed: int = 0
    ckpt_path: Any = None  # a checkpoint to resume from
    resume: Any = None  # "auto": the last good checkpoint of this run folder, if any
    optimized_metric: str = "val/vlb_bpd"  # returned by the Hydra main: the objective of hparams_search
    objective: str = "diffusion"  # diffusion | classifier (the noisy classifier for guidance)
    classifier: Any = None  # EncoderUNet args + max_t (conf/classifier/), used when objective=classifier
    allow_any_target: bool = False  # false: _target_ only in ddpm_lightning, torch, lightning, ... (security.py)


def register_configs() -> None:
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="run_schema", node=RunConfig)
