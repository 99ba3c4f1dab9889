"""The work of ddpm-train: ``train(cfg)`` is a plain function returning the final metrics.

The Hydra entry point (``ddpm_lightning.cli.train``) composes and validates before importing this module
(Lightning). ``train`` owns its run folder (``run_folder.claim``), refuses to overwrite another run's files,
and inside a sweep skips finished jobs and resumes unfinished ones.
"""

from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from omegaconf import DictConfig, OmegaConf, open_dict

from .. import artifacts
from ..callbacks import GenerativeMetricsCallback, SampleGridCallback
from ..callbacks.console import ModelSummaryLine
from ..callbacks.estimate import TrainingEstimate
from ..callbacks.health import TrainingHealth
from ..callbacks.posthoc_ema import PostHocEMASnapshots
from ..callbacks.preemption import Preemption
from ..callbacks.resume import ResumeChanges
from ..config.schema import EMAConfig
from ..loggers import build_loggers, finish_wandb, record_provenance, wandb_run_info
from ..modules import DiffusionModule
from ..modules.checkpoint import check_checkpoint_fits, check_same_run, find_resume_checkpoint, load_checkpoint_dict
from ..modules.classifier_module import build_classifier_module
from ..precision import check_accelerator, resolve_precision
from ..provenance import provenance
from ..security import check_targets, redact_secrets
from .console import quiet_console
from .errors import in_multirun
from .run_folder import check_ownership, claim, folder_state, is_secondary_rank, release
from .validate import check_run, process_count_error, usable_cpus


def _container(node) -> Any:
    return OmegaConf.to_container(node, resolve=True) if node is not None else None


def build_module(cfg: DictConfig, datamodule) -> DiffusionModule:
    """The DiffusionModule for this config and data set (sizes and classes come from the data)."""
    if cfg.get("objective", "diffusion") not in ("diffusion", "classifier"):
        raise ValueError(f"objective={cfg.objective!r}; allowed: diffusion, classifier")
    run_config = redact_secrets(_container(cfg))  # stored in checkpoints: no API keys or tokens
    if cfg.get("objective") == "classifier":
        return build_classifier_module(run_config, datamodule)
    return DiffusionModule(
        model=_container(cfg.model), diffusion=_container(cfg.diffusion), optim=_container(cfg.optim),
        ema=_container(cfg.ema), image_size=int(datamodule.image_size), channels=int(datamodule.channels),
        num_classes=datamodule.num_classes, p_uncond=float(cfg.train.p_uncond),
        timestep_sampler=cfg.train.timestep_sampler, sample=_container(cfg.sample),
        run_config=run_config)


def build_callbacks(cfg: DictConfig, has_logger: bool = True) -> list[pl.Callback]:
    """The configured callbacks plus, always on, ``Preemption`` (SIGTERM / requeue signals, exact-resume
    checkpoints), ``TrainingEstimate`` (the work and the estimated time, in the first steps) and
    ``TrainingHealth`` (grad norm, non-finite step guard)."""
    nodes = cfg.get("callbacks") or {}
    callbacks = [instantiate(node) for node in nodes.values() if node is not None and "_target_" in node]
    if not has_logger:  # LearningRateMonitor refuses a logger-less trainer
        callbacks = [c for c in callbacks if not isinstance(c, pl.callbacks.LearningRateMonitor)]
    if (cfg.get("trainer") or {}).get("enable_model_summary", True) is not False:
        callbacks.append(ModelSummaryLine())  # one line instead of Lightning's table (its FLOPs column is 0 here)
    health = TrainingHealth(max_nonfinite_steps=cfg.get("train", {}).get("max_nonfinite_steps", 5))
    ema = cfg.get("ema") or {}
    if ema.get("posthoc_sigma_rels") and cfg.get("objective", "diffusion") == "diffusion":
        # the power EMAs the module tracks, snapshotted into <run>/posthoc_ema
        callbacks.append(PostHocEMASnapshots(int(ema.get("posthoc_every_n_steps", EMAConfig.posthoc_every_n_steps))))
    return [Preemption(), TrainingEstimate(), *callbacks, health]


def resolve_checkpoint(cfg: DictConfig) -> tuple[str | None, dict | None]:
    """The checkpoint to resume from and its content (loaded with ``weights_only=True``), or (None, None).

    ``ckpt_path`` if given (a corrupt file is an error naming it); else with ``resume=auto`` the newest
    checkpoint of this run folder that loads (``last.ckpt`` first among equally new ones), skipping
    truncated or corrupt files with a warning.
    """
    if cfg.get("ckpt_path"):
        path = Path(cfg.ckpt_path)
        if not path.is_file():
            raise FileNotFoundError(f"ckpt_path={path} does not exist; give the path of a .ckpt file")
        return str(path), load_checkpoint_dict(path)
    if cfg.get("resume") not in (None, "auto"):
        raise ValueError(f"resume={cfg.resume!r}; allowed: auto, null (use ckpt_path=... for a specific file)")
    if cfg.get("resume") == "auto":
        folder = Path(cfg.paths.output_dir) / "checkpoints"
        found = find_resume_checkpoint(folder)
        if found is not None:
            rank_zero_info(f"resume=auto: resuming from {found[0]} (step {found[1].get('global_step')})")
            return str(found[0]), found[1]
        rank_zero_info(f"resume=auto: no checkpoint in {folder}, starting from scratch")
    return None, None


def train(cfg: DictConfig) -> dict[str, float]:
    """Train the configured run; returns the final logged metrics as floats.

    The run folder (``paths.output_dir``) is owned for the duration (a second run into it is refused); a
    folder holding another run's files is refused unless this run continues it (``resume=auto``); in a sweep
    a finished job returns its recorded metrics and an unfinished one resumes.
    """
    quiet_console()  # one line per event: one log handler, no third-party tips
    check_targets(cfg, allow_any=bool(cfg.get("allow_any_target", False)))
    check_accelerator(cfg.trainer.get("accelerator"))
    check_trainer_devices(cfg)
    output_dir = Path(cfg.paths.output_dir)
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ValueError(f"cannot create the run folder {output_dir} ({error.strerror or error}); "
                         f"set hydra.run.dir to a writable folder") from None
    check_run(cfg)
    claimed = not is_secondary_rank() and claim(output_dir)
    try:
        recorded = _own_run_folder(cfg, output_dir)
        return recorded if recorded is not None else _train(cfg, output_dir)
    finally:
        if claimed:
            release(output_dir)


def check_trainer_devices(cfg: DictConfig) -> None:
    """``trainer.devices``: no more processes than GPUs (or, training on the CPU, than CPU cores), before any
    process starts (``trainer.accelerator=cpu`` is checked before torch is imported)."""
    accelerator = str(cfg.trainer.get("accelerator", "auto"))
    cuda = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    if accelerator not in ("auto", "cpu", "gpu", "cuda"):
        return
    error = process_count_error(cfg.trainer.get("devices"), "trainer.devices",
                                cpus=None if cuda else usable_cpus(), gpus=torch.cuda.device_count() if cuda else None)
    if error:
        raise ValueError(error)


def _job_overrides() -> list[str]:
    """This job's command-line overrides as typed (interpolations unresolved, secrets redacted)."""
    if not HydraConfig.initialized():
        return []
    return redact_secrets(OmegaConf.to_container(HydraConfig.get().overrides.task, resolve=False))


def _own_run_folder(cfg: DictConfig, output_dir: Path) -> dict[str, float] | None:
    """The recorded metrics of a finished sweep job (skip it); else None, with ``resume=auto`` set for an
    unfinished sweep job. Outside a sweep, another run's files are refused (``check_ownership``)."""
    if is_secondary_rank():
        return None
    if not in_multirun():
        check_ownership(output_dir, cfg.get("resume"), cfg.get("ckpt_path"))
        return None
    state, what = folder_state(output_dir)
    if state == "new":
        return None
    summary = artifacts.read_summary(output_dir) or {}
    recorded = summary.get("overrides")
    if recorded is not None and sorted(recorded) != sorted(_job_overrides()):
        raise ValueError(f"sweep job folder {output_dir} holds a different job ({' '.join(recorded)}); "
                         f"re-run the same sweep command there, or choose another hydra.sweep.dir")
    if state == "finished":
        rank_zero_info(f"skipping finished sweep job {output_dir} (step {summary.get('global_step')}); "
                       f"its recorded metrics are returned")
        return {k: float(v) for k, v in (summary.get("metrics") or {}).items()}
    if cfg.get("resume") is None and not cfg.get("ckpt_path"):
        rank_zero_info(f"sweep job folder {output_dir} holds {what}: resuming it (resume=auto)")
        with open_dict(cfg):
            cfg.resume = "auto"
    return None


def _check_resume_point(checkpoint: dict, cfg: DictConfig, path: str, output_dir: Path) -> bool:
    """True when this run's own checkpoint has no training step left (a kill during the final scoring)."""
    step, max_steps = int(checkpoint.get("global_step", 0)), cfg.trainer.get("max_steps")
    if isinstance(max_steps, int) and max_steps >= 0 and step >= max_steps:
        if output_dir.resolve() in Path(path).resolve().parents:
            rank_zero_info(f"{path} is at step {step} >= trainer.max_steps={max_steps}: no training steps left, "
                           f"finishing the run (end-of-training samples and scores)")
            return True
        raise ValueError(f"ckpt_path={path} is at step {step}, trainer.max_steps={max_steps}: nothing to train; "
                         f"raise trainer.max_steps")
    return False


def _check_checkpoint_space(module: torch.nn.Module, cfg: DictConfig, output_dir: Path) -> None:
    """Refuse before training when the checkpoints this run keeps cannot fit on the run folder's disk."""
    parameters = sum(p.numel() * p.element_size() for p in module.parameters())
    nodes = [n for n in (cfg.get("callbacks") or {}).values() if n is not None and "ModelCheckpoint" in
             str(n.get("_target_", ""))]
    kept = sum(max(int(n.get("save_top_k", 1)), 0) + bool(n.get("save_last")) for n in nodes)
    # the module's tensors (network + EMA copy) + 2 AdamW moments ~ 2x the module per file, one more being written
    artifacts.check_space(output_dir, 2 * parameters * (kept + 1), f"the {kept} checkpoint(s) this run keeps")


def _train(cfg: DictConfig, output_dir: Path) -> dict[str, float]:
    pl.seed_everything(int(cfg.seed), workers=True, verbose=False)
    datamodule = instantiate(cfg.data)
    module = build_module(cfg, datamodule)
    ckpt_path, checkpoint = resolve_checkpoint(cfg)
    trained_out, changes = False, []
    if checkpoint is not None:  # a different architecture fails here in one line, before anything is written
        check_checkpoint_fits(module, checkpoint, ckpt_path)
        changes = check_same_run(checkpoint.get("run_config"), _container(cfg), ckpt_path)
        trained_out = _check_resume_point(checkpoint, cfg, ckpt_path, output_dir)
        if changes:  # applied from the resume step on (modules.checkpoint.RESUME_APPLIED), said once
            rank_zero_info(f"resume: step {checkpoint.get('global_step')} continues with the changed "
                           f"{'; '.join(changes)}")
        del checkpoint
    if not is_secondary_rank():
        _check_checkpoint_space(module, cfg, output_dir)
    loggers = build_loggers(cfg)
    precision = resolve_precision(cfg.trainer.get("precision", "32-true"), cfg.trainer.get("accelerator"))
    callbacks = build_callbacks(cfg, has_logger=bool(loggers))
    if changes:
        callbacks.append(ResumeChanges(changes, _container(cfg.optim), module.run_config))
    trainer: pl.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False, precision=precision)
    made_by = provenance(precision=trainer.precision, world_size=trainer.world_size)  # at the start: the code that runs
    record_provenance(loggers, made_by)
    start = time.perf_counter()
    try:
        with warnings.catch_warnings():  # our sampler resumes mid-epoch exactly (data/sampler.py): not a concern
            warnings.filterwarnings("ignore", message=r".*resuming from a checkpoint that ended before the epoch")
            # the EMA copy stays in eval mode on purpose (evaluated, never trained): not the mistake Lightning fears
            warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training")
            trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    except SystemExit as stop:
        # Lightning turns Ctrl-C into exit(1) after its graceful shutdown; Preemption's exits (143 on SIGTERM,
        # 75 for requeue) keep their codes
        if trainer.interrupted and stop.code == 1:
            raise KeyboardInterrupt from None
        raise
    finally:
        finish_wandb(failed=sys.exc_info()[0] is not None)
    if trained_out:  # Lightning skips a loop with no step left, and with it on_train_end: the final outputs
        for callback in trainer.callbacks:
            if isinstance(callback, (GenerativeMetricsCallback, SampleGridCallback)):
                callback.on_train_end(trainer, module)
    fit_seconds = time.perf_counter() - start
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if getattr(v, "numel", lambda: 1)() == 1}
    for callback in trainer.callbacks:  # end-of-training scores (FID@n, ...) are not in callback_metrics
        metrics.update(getattr(callback, "last_results", None) or {})
    _write_summary(trainer, output_dir, metrics, train_seconds=round(fit_seconds, 2),
                   num_parameters=sum(p.numel() for p in getattr(module, "net", module).parameters()),
                   overrides=_job_overrides(), provenance=made_by, wandb=wandb_run_info(loggers))
    return metrics


@rank_zero_only
def _write_summary(trainer: pl.Trainer, output_dir: Path, metrics: dict[str, float], **extra: Any) -> None:
    """``summary.json``: status, steps, ``extra`` (num_parameters, train_seconds = trainer.fit wall time, the job's
    overrides (a re-run sweep compares them), ``provenance``, the W&B run or null), final metrics and output paths;
    ``ddpm-report`` reads it."""
    summary = {"status": "completed", "global_step": trainer.global_step, **extra, "metrics": metrics,
               "outputs": {}}
    if trainer.checkpoint_callback is not None and getattr(trainer.checkpoint_callback, "dirpath", None):
        summary["outputs"]["checkpoints"] = str(trainer.checkpoint_callback.dirpath)
        if trainer.checkpoint_callback.last_model_path:
            summary["outputs"]["last_checkpoint"] = trainer.checkpoint_callback.last_model_path
    for callback in trainer.callbacks:
        if getattr(callback, "last_path", None):
            summary["outputs"]["sample_grid"] = str(callback.last_path)
    for logger in trainer.loggers:
        if getattr(logger, "log_dir", None):
            summary["outputs"].setdefault("logs", []).append(str(logger.log_dir))
    artifacts.write_json(output_dir / artifacts.SUMMARY_FILE, summary)
    print(f"\nrun folder: {output_dir}")
    for key, value in summary["outputs"].items():
        print(f"  {key}: {value}")
    shown = {k: round(v, 4) for k, v in metrics.items() if k.startswith(("val/", "train/loss"))}
    print(f"  metrics: {shown}")
