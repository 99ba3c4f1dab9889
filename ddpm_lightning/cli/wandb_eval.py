"""``ddpm-eval ... logger=wandb``: an evaluation as a W&B run of ``job_type=eval`` in the group of the checkpoint's
training run, its config holding that run's id (``train_run_id``).

The researcher finds it from the training run: in the training run's group (a sweep's group, or ``run-<id>`` for a
single run), or by filtering ``config.train_run_id``. The training run is the one kept in the checkpoint's run folder
(``<run>/wandb_run.json``; a checkpoint copied elsewhere has none: ``train_run_id`` is then null). Each evaluation
folder keeps its own W&B run (its own ``wandb_run.json``): concurrent evaluations of one checkpoint (other folders)
never write into each other's run or into the training run, and rerunning into the same folder continues its run.
Logged: ``eval/<metric>`` (also in the run's summary), the grid captioned with the sampler settings and guidance,
and in the config the settings and the provenance; the project is the training run's (groups are per project). A
checkpoint series (``ckpts=``) is one run with a row per checkpoint, ``eval/*`` drawn against ``ckpt_step``. Off
unless ``logger=wandb``; offline unless a key is configured (``loggers.open_wandb_run``: the same fallback and folder
rules as training).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ..artifacts import RESULTS_FILE, WANDB_RUN_FILE, read_json, write_json
from .run_folder import is_secondary_rank

DEFAULT_PROJECT = "ddpm_lightning"


def check_logger(cfg: DictConfig) -> bool:
    """Whether ``logger=wandb`` is given; a ValueError (one line, before any work) for another logger, which
    ``ddpm-eval`` would ignore. Resolves nothing (the checks run before Hydra's run state exists)."""
    nodes = cfg.get("logger") or {}
    other = [name for name in nodes if name != "wandb" and nodes.get(name) is not None]
    if other:
        raise ValueError(f"ddpm-eval logs to W&B only: logger={other[0]} would be ignored; give logger=wandb or "
                         f"drop logger=")
    return nodes.get("wandb") is not None


def wandb_settings(cfg: DictConfig) -> dict[str, Any] | None:
    """The ``logger.wandb`` node of ``logger=wandb`` as a plain dict, or None (``check_logger``)."""
    return OmegaConf.to_container(cfg.logger.wandb, resolve=True) if check_logger(cfg) else None


def training_run(ckpt: str | Path | None) -> dict[str, Any] | None:
    """The W&B run kept by the run folder of ``ckpt`` (a checkpoint, a run folder or its ``checkpoints/``)."""
    if not ckpt:
        return None
    path = Path(str(ckpt)).expanduser().resolve()
    for folder in [path, *path.parents][:3]:
        record = read_json(folder / WANDB_RUN_FILE)
        if record and record.get("id") and record.get("job_type", "train") == "train":
            return record
    return None


def guidance_text(guidance: dict[str, Any] | None) -> str:
    """``unguided``, or the kinds of guidance on: ``classifier scale 2``, ``cfg 1.5``, ``autoguidance 2``."""
    guidance = guidance or {}
    parts = [f"classifier scale {guidance['scale']:g}" if guidance.get("scale") else "",
             f"cfg {guidance['cfg_scale']:g}" if guidance.get("cfg_scale") else "",
             f"autoguidance {guidance['autoguidance_scale']:g}"
             if guidance.get("autoguidance_ckpt") and guidance.get("autoguidance_scale", 1) != 1 else ""]
    return ", ".join(part for part in parts if part) or "unguided"


def caption(results: dict[str, Any]) -> str:
    """``500 samples at step 3000: ddpm, 15 steps, unguided`` (eta for DDIM, the schedule when not ADM's)."""
    sampling = results.get("sampling") or {}
    generation = results.get("generation") or {}
    count = int(generation.get("generated", 0)) + int(generation.get("skipped", 0))  # this run's + kept shards'
    eta = f", eta {sampling.get('eta'):g}" if sampling.get("method") == "ddim" and sampling.get("eta") is not None \
        else ""
    schedule = f", {sampling['schedule']} schedule" if sampling.get("schedule") not in (None, "adm") else ""
    step = f" at step {results['ckpt_step']}" if results.get("ckpt_step") is not None else ""
    return (f"{f'{count} samples' if count else 'samples'}{step}: {sampling.get('method')}, {sampling.get('steps')} "
            f"steps{eta}{schedule}, {guidance_text(results.get('guidance'))}")


def _row(results: dict[str, Any], folder: Path) -> dict[str, Any]:
    import wandb

    row: dict[str, Any] = {f"eval/{key}": float(value) for key, value in (results.get("metrics") or {}).items()
                           if isinstance(value, int | float) and not isinstance(value, bool)}
    grid = (results.get("outputs") or {}).get("grid") or folder / "grid.png"
    if Path(grid).is_file():
        row["eval/grid"] = wandb.Image(str(grid), caption=caption(results))
    return row


def log_evaluation(cfg: DictConfig, out_dir: Path, results: dict[str, Any]) -> dict[str, Any]:
    """Log ``results`` (a ``results.json``, or a series' record) to W&B when ``logger=wandb``; rank 0 only. The
    single evaluation's ``results.json`` gets the run's ``wandb`` block. Returns ``results``."""
    settings = wandb_settings(cfg)
    if settings is None or is_secondary_rank():
        return results
    from ..loggers import open_wandb_run

    series = results.get("checkpoints")
    rows = ([(read_json(out_dir / item["folder"] / RESULTS_FILE) or {"metrics": item.get("metrics")},
              out_dir / item["folder"]) for item in series] if series is not None else [(results, out_dir)])
    first = rows[0][0] if rows else {}
    ckpt = cfg.get("ckpts") or cfg.get("ckpt")
    train = training_run(ckpt) or {}
    config = {"train_run_id": train.get("id"), "train_run_group": train.get("group"), "ckpt": str(ckpt),
              "num_samples": cfg.get("num_samples"), "seed": cfg.get("seed"),
              "metrics": list(cfg.get("metrics") or []), "precision": cfg.get("precision"),
              "reference": cfg.get("reference"), "sampling": first.get("sampling"), "guidance": first.get("guidance"),
              "provenance": first.get("provenance")}
    name = settings.get("name") or (f"eval-series-{Path(str(ckpt)).name}" if series is not None
                                    else f"eval-step{first.get('ckpt_step')}")
    run = open_wandb_run(out_dir, record_file=WANDB_RUN_FILE,
                         project=train.get("project") or settings.get("project") or DEFAULT_PROJECT, name=name,
                         group=settings.get("group") or train.get("group"), job_type="eval",
                         tags=["eval", *(settings.get("tags") or [])], config=config, mode=settings.get("mode"))
    if series is not None:
        run.run.define_metric("ckpt_step")
        run.run.define_metric("eval/*", step_metric="ckpt_step")
    for one, folder in rows:
        data = _row(one, folder)
        run.log({**data, "ckpt_step": one.get("ckpt_step")} if series is not None else data)
    if series is None:
        run.run.summary.update({k: v for k, v in _row(results, out_dir).items() if k != "eval/grid"})
    run.finish()
    info = {"id": run.id, "project": run.record.get("project"), "group": run.record.get("group"), "job_type": "eval",
            "train_run_id": train.get("id"), "dir": str(out_dir / "wandb")}
    print(f"W&B: eval run {run.id} (job_type=eval, group {info['group']}, training run {info['train_run_id']}) "
          f"in {info['dir']}")
    if series is None and (out_dir / RESULTS_FILE).is_file():
        results = {**results, "wandb": info}
        write_json(out_dir / RESULTS_FILE, results, default=str)
    return results
