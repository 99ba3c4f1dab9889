"""Dataclass schemas for the run config: a wrong key or type fails before any work.

Groups whose implementation users swap (data, trainer, logger, callbacks, hydra launcher) are free-form
``_target_`` nodes; the rest are typed here. Allowed string values are checked where they are used
(GaussianDiffusion, samplers) with messages that list them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore


@dataclass
class ModelConfig:
    """ADM UNet flags (names as in OpenAI's code); image/channel/class sizes come from the data set."""

    model_channels: int = 64
    num_res_blocks: int = 2
    attention_resolutions: list[int] = field(default_factory=lambda: [16])
    dropout: float = 0.0
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


@dataclass
class OptimConfig:
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    warmup_steps: int = 0
    fused: Any = None  # None: torch's default (foreach); true: fused kernel


@dataclass
class EMAConfig:
    decay: float = 0.9999
    warmup: bool = True  # decay_n = min(decay, (1 + n) / (10 + n))


@dataclass
class TrainConfig:
    timestep_sampler: str = "uniform"  # uniform | loss-second-moment
    p_uncond: float = 0.0  # label dropout for classifier-free guidance
    max_nonfinite_steps: int | None = 5  # stop after this many consecutive skipped non-finite steps (null: never)


@dataclass
class SampleConfig:
    method: str = "ddim"  # ddpm | ddim | dpm++2m | dpm++3m | dpm++2m-sde | unipc
    steps: Any = 25  # network calls: int; with schedule=adm also "ddim25", "250", "10,15,20", or null for all T
    eta: float = 0.0  # DDIM only
    schedule: str = "adm"  # adm (ADM respacing) | uniform | logsnr | karras | trailing
    lower_order_final: bool = True  # DPM-Solver++/UniPC: lower orders for the last steps below 15 steps
    clip_denoised: bool = True
    batch_size: int = 64


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
    evaluate_after_fit: bool = True
    optimized_metric: str = "val/vlb_bpd"  # returned by the Hydra main: the objective of hparams_search
    objective: str = "diffusion"  # diffusion | classifier (the noisy classifier for guidance)
    classifier: Any = None  # EncoderUNet args + max_t (conf/classifier/), used when objective=classifier
    allow_any_target: bool = False  # false: _target_ only in ddpm_lightning, torch, lightning, ... (security.py)


def register_configs() -> None:
    ConfigStore.instance().store(name="run_schema", node=RunConfig)
