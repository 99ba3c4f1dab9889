"""ddpm-eval: score a checkpoint (or existing samples) with FID / sFID / KID / precision-recall / IS and NLL.

Writes ``results.json``, ``grid.png`` and ``samples.npz`` (ADM evaluator layout) into the run folder. The
samples stream to ``<output_dir>/shards`` with their features (``shards.py``): ``devices=N`` shares the
generation and the feature pass over N processes, rank 0 scores the gathered features, and an interrupted
run continues when rerun into the same folder. ``reference=<ADM reference batch .npz>`` scores against
OpenAI's statistics; ``write_reference=<path.npz>`` writes the data set's own batch in that layout.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hydra
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from ..config import CONFIG_PATH
from .deprecated import apply_to_command_line
from .errors import run_cli
from .required_keys import missing_keys, missing_keys_message
from .validate import check_command_line, check_ignored_inputs
from .wandb_eval import check_logger, log_evaluation

if TYPE_CHECKING:  # torch, Lightning and the metrics are imported once the config is checked (a fast --help)
    import torch

    from ..metrics import FeatureStats


def negative_log_likelihood(module, images: torch.Tensor, labels: torch.Tensor | None,
                            batch_size: int) -> dict[str, float]:
    """Exact VLB in bits/dim (full T-step loop) on held-out images, with its prior / decoder / quartile parts."""
    import torch

    with torch.no_grad():
        return _negative_log_likelihood(module, images, labels, batch_size)


def _negative_log_likelihood(module, images: torch.Tensor, labels: torch.Tensor | None,
                             batch_size: int) -> dict[str, float]:
    import torch
    from lightning.pytorch.utilities import rank_zero_info

    from ..diffusion import NUM_QUARTILES, vb_by_quartile
    from ..metrics.progress import ProgressLines

    diffusion, net = module.diffusion, module.ema_net
    totals, priors, decoders, quartiles = [], [], [], []
    progress = ProgressLines(len(images), f"nll: the {diffusion.num_timesteps}-step VLB of {len(images)} held-out "
                             f"images", rank_zero_info, unit="images")
    for start in range(0, len(images), batch_size):
        x = images[start:start + batch_size].to(module.device)
        kwargs = {}
        if module.num_classes is not None and labels is not None:
            kwargs["y"] = labels[start:start + batch_size].to(module.device)
        out = diffusion.calc_bpd_loop(net, x, clip_denoised=True, model_kwargs=kwargs)
        totals.append(out["total_bpd"])
        priors.append(out["prior_bpd"])
        decoders.append(out["vb"][:, 0])
        quartiles.append(vb_by_quartile(out["vb"]))
        progress.update(len(x))
    quartile_means = torch.cat(quartiles).mean(0)
    return {"nll_bpd": float(torch.cat(totals).mean()), "nll_prior_bpd": float(torch.cat(priors).mean()),
            "nll_decoder_bpd": float(torch.cat(decoders).mean()),
            **{f"nll_vb_q{q}_bpd": float(quartile_means[q]) for q in range(NUM_QUARTILES)}}


def evaluate(cfg: DictConfig) -> dict:
    from .console import quiet_console
    from .generation import keep_finished_shards

    quiet_console()  # one line per event: one log handler, no third-party tips
    if cfg.get("ckpts"):  # a run's checkpoints in step order, one folder each, sharing the scorer
        from .series import evaluate_series

        record = evaluate_series(cfg, lambda one, folder, reuse: keep_finished_shards(
            folder, lambda: _evaluate(one, folder, reuse)))
        return log_evaluation(cfg, Path(cfg.output_dir), record)  # logger=wandb: one eval run, a row per checkpoint
    out_dir = Path(cfg.output_dir)
    results = keep_finished_shards(out_dir, lambda: _evaluate(cfg, out_dir))
    return log_evaluation(cfg, out_dir, results)  # logger=wandb: a job_type=eval run in the training run's group


@dataclass(frozen=True)
class EvalPlan:
    """What one ``ddpm-eval`` run does, decided from its config before any work (``plan_evaluation``)."""

    sample_metrics: tuple[str, ...]  # scored from samples: every asked metric but nll
    nll: bool  # the exact NLL on held-out images (needs ckpt)
    generate: bool  # ckpt: sample (and score with sample_metrics; metrics=[]: samples only)
    score_samples: bool  # samples=: score existing samples
    write_reference: str | None  # write the data set's reference batch here

    @property
    def needs_scorer(self) -> bool:
        return bool(self.sample_metrics) or self.write_reference is not None


def plan_evaluation(cfg: DictConfig) -> EvalPlan:
    """The steps ``cfg`` asks for; combinations that cannot work are refused here, before any import or work."""
    missing = missing_keys(cfg)  # also checked by a Hydra callback; here for evaluate() called directly
    if missing:
        raise ValueError(missing_keys_message(missing))
    check_ignored_inputs(cfg)  # ckpt= with samples=, ...: both given is refused, never one silently ignored
    check_logger(cfg)  # logger=wandb or none: another logger would be ignored
    if cfg.get("ckpts") and (cfg.get("ckpt") or cfg.get("samples")):
        raise ValueError("ckpts= scores every checkpoint of a run: drop ckpt= and samples= (or drop ckpts=)")
    if cfg.get("ckpt_step") is not None and not cfg.get("ckpts"):
        raise ValueError("ckpt_step= picks one checkpoint of a series: give ckpts=<run folder> too")
    ckpt, samples, write_reference = cfg.get("ckpt") or cfg.get("ckpts"), cfg.get("samples"), cfg.get("write_reference")
    if not ckpt and not samples and not write_reference:
        raise ValueError("give ckpt=<a ddpm-train checkpoint> or samples=<an .npz or image folder> to evaluate "
                         "(or write_reference=<path.npz> with data=<name>)")
    metrics = [str(m) for m in cfg.metrics]
    if not ckpt:
        if "nll" in metrics:
            raise ValueError("metrics=[nll] needs a model: give ckpt=...")
        if cfg.get("ema_sigma_rel") is not None:
            raise ValueError("ema_sigma_rel=... rebuilds a model's EMA: give ckpt=... (a run with post-hoc EMA)")
        if not cfg.get("data") and (write_reference or not cfg.get("reference")):
            raise ValueError("samples=... and write_reference=... need data=<name> (e.g. data=animal_mnist) for the "
                             "reference images (or, for samples=, reference=<an ADM reference batch .npz>)")
    sample_metrics = tuple(m for m in metrics if m != "nll")
    generate = bool(ckpt) and (bool(sample_metrics) or not metrics)
    return EvalPlan(sample_metrics=sample_metrics, nll="nll" in metrics, generate=generate,
                    score_samples=bool(samples) and not generate,
                    write_reference=str(write_reference) if write_reference else None)


class CheckPlan(Callback):
    """A Hydra callback: ``plan_evaluation`` of a ``ddpm-eval`` run before any work (torch is not imported yet)."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            plan_evaluation(config)
        except ValueError as error:
            print(f"error: {error}", file=sys.stderr)
            sys.exit(2)


def _evaluate(cfg: DictConfig, out_dir: Path, reuse: dict | None = None) -> dict:
    """plan -> load -> reference -> generate (every process) -> score and NLL (rank 0) -> results.json. ``reuse``
    (a checkpoint series): the data set and the scorer of the series' first checkpoint, kept for the others."""
    plan = plan_evaluation(cfg)
    from ..modules.checkpoint import checkpoint_step
    from ..provenance import provenance
    from .generation import generate, resolve_device
    from .shards import Processes, launch

    device = resolve_device(cfg.device)
    procs = launch(int(cfg.get("devices", 1)), device) if cfg.ckpt else Processes(device=device)
    results: dict = {"ckpt": cfg.ckpt, "samples": cfg.samples, "reference": cfg.get("reference"), "metrics": {}}
    results["provenance"] = provenance(precision=cfg.precision, world_size=procs.world_size)
    module, run = _load_model(cfg, plan, out_dir, procs, results) if cfg.ckpt else (None, None)
    if cfg.ckpt:
        results["ckpt_step"] = checkpoint_step(cfg.ckpt)  # the training step: ddpm-report's x axis of a series
    reuse = {} if reuse is None else reuse
    datamodule = reuse["datamodule"] if "datamodule" in reuse else _datamodule(cfg, plan, module)
    if procs.rank == 0 and (warning := other_data_warning(cfg, module)):
        print(f"warning: {warning}", file=sys.stderr, flush=True)  # legitimate (cross-data FID), never silent
    scorer = reuse.get("scorer") or (_scorer(cfg, plan, datamodule, procs) if plan.needs_scorer else None)
    reuse.update(datamodule=datamodule, scorer=scorer)  # every process: shared pass
    if plan.write_reference:
        results["reference_written"] = str(_write_reference(cfg, datamodule, scorer))
    generated = generate(module, run, procs=procs, scorer=scorer if plan.sample_metrics else None) \
        if plan.generate else None
    if procs.rank == 0:  # rank 0 scores what every process generated and writes results.json
        _score_on_rank_zero(cfg, plan, results, generated, module, run, datamodule, scorer)
        return _finish(out_dir, results)
    return generated or {}  # the other processes: their share of the shards (and features) only


def _score_on_rank_zero(cfg: DictConfig, plan: EvalPlan, results: dict, generated: dict | None, module, run,
                        datamodule, scorer) -> None:
    """The generated shards' or the given samples' scores and the held-out NLL, into ``results``."""
    if generated is not None:
        _record_generation(results, generated)
        if plan.sample_metrics:
            _score_shards(results, scorer, module, run, spatial="sfid" in plan.sample_metrics)
    if plan.score_samples:
        _score_samples(cfg, plan, results, scorer, datamodule)
    if plan.nll:
        results["metrics"].update(_held_out_nll(cfg, module, datamodule))


def _load_model(cfg: DictConfig, plan: EvalPlan, out_dir: Path, procs, results: dict):
    """The model and its ``Generation`` (sampler resolved, guidance loaded), post-hoc EMA applied, and the disk
    checked for the samples before minutes of scoring setup (statistics, classifier)."""
    import dataclasses

    from lightning.pytorch.utilities import rank_zero_warn

    from .generation import plan_generation
    from .posthoc_ema import COARSE_FIT, apply_posthoc_ema, coarse_fit_advice
    from .shards import check_disk, finished

    module, run = plan_generation(cfg, out_dir, procs.device)
    if cfg.get("ema_sigma_rel") is not None:  # post-hoc EMA: score the EMA of this length (EDM2)
        results["posthoc_ema"] = apply_posthoc_ema(module, cfg.ckpt, float(cfg.ema_sigma_rel))
        if results["posthoc_ema"]["fit_error"] > COARSE_FIT:
            rank_zero_warn(coarse_fit_advice(results["posthoc_ema"]))
    if not cfg.get("data") and not module.run_config.get("data") and not cfg.get("reference"):
        raise ValueError(f"{cfg.ckpt} stores no data config; pass data=<name> for the reference images "
                         f"(or reference=<an ADM reference batch .npz>)")
    results["guidance"] = dataclasses.asdict(run.guidance_config)
    if plan.generate:
        done = sum(end - start for start, end in finished(out_dir / "shards", run.num_samples, run.shard_size))
        check_disk(out_dir, run.num_samples, done, tuple(module.image_shape), scored=bool(plan.sample_metrics))
    return module, run


def _datamodule(cfg: DictConfig, plan: EvalPlan, module):
    """The data set behind the reference statistics, NLL and is_clf (``data=``, else the checkpoint's own); None:
    scored against ``reference=`` alone."""
    from hydra.utils import instantiate

    data_cfg = cfg.data if cfg.get("data") else (module.run_config.get("data") if module is not None else None)
    datamodule = instantiate(data_cfg) if data_cfg else None
    if datamodule is None and (plan.nll or "is_clf" in plan.sample_metrics):
        raise ValueError("metrics nll and is_clf need the data set: pass data=<name> (or drop them)")
    return datamodule


SCORED_DATA_KEYS = ("_target_", "name", "path", "image_size", "mode")  # what makes the reference another data set


def other_data_warning(cfg: DictConfig, module) -> str | None:
    """Why the scores would compare a checkpoint's samples with another data set than it was trained on (``data=``
    naming another one, or ``reference=`` images of another size), or None."""
    own = (module.run_config.get("data") if module is not None else None) or {}
    if not own:
        return None
    if cfg.get("data"):
        given = OmegaConf.to_container(cfg.data, resolve=True)
        differ = [f"data.{k}={given.get(k)!r} here, {own.get(k)!r} in the checkpoint" for k in SCORED_DATA_KEYS
                  if k in given and k in own and given.get(k) != own.get(k)]
        if differ:
            return (f"scoring against another data set than the checkpoint was trained on ({'; '.join(differ)}); "
                    f"drop data= to score against its own")
    if cfg.get("reference"):
        from ..metrics.npz import npz_member

        try:
            shape, _ = npz_member(Path(str(cfg.reference)).expanduser(), "arr_0")
        except (KeyError, OSError, ValueError):
            return None
        if len(shape) == 4 and shape[1] != module.image_shape[-1]:
            return (f"reference={cfg.reference} holds {shape[1]} px images, the checkpoint makes "
                    f"{module.image_shape[-1]} px ones: the scores compare them with another data set")
    return None


def _scorer(cfg: DictConfig, plan: EvalPlan, datamodule, procs):
    """The metrics with their reference statistics; every process at once (they share the reference feature pass,
    the statistics of one process)."""
    from lightning.pytorch.utilities import rank_zero_info

    from ..metrics import make_generative_metrics

    return make_generative_metrics(
        datamodule, metrics=list(plan.sample_metrics) or ["fid", "sfid"], feature=cfg.feature,
        weights_path=cfg.weights_path, reference_split=cfg.reference_split, reference_n=int(cfg.reference_n),
        pr_reference_n=int(cfg.pr_reference_n), reference=cfg.get("reference"), cache_dir=cfg.cache_dir,
        classifier_epochs=int(cfg.classifier_epochs), batch_size=int(cfg.batch_size), device=procs.device,
        progress=procs.rank == 0, log=rank_zero_info, rank=procs.rank, world_size=procs.world_size)


def _record_generation(results: dict, generated: dict) -> None:
    from .generation import sampling_time

    results["sampling"], results["generation"] = generated["sampling"], generated["generation"]
    results["outputs"] = generated["outputs"]
    results |= sampling_time(generated["generation"])


def _score_shards(results: dict, scorer, module, run, spatial: bool) -> None:
    """Score the generated shards in index order (their stored features; with ``spatial`` the sFID features
    folded into streamed statistics)."""
    import torch

    from ..metrics import FeatureStats
    from .shards import shard_outputs

    parts, part_labels = [], []
    stats = FeatureStats() if spatial else None
    for outputs, shard_labels in shard_outputs(run.out_dir / "shards", run.num_samples, run.shard_size,
                                               scorer.outputs_id, scorer.outputs,
                                               set(scorer.outputs(_probe(module)))):
        if stats is not None:
            stats.update(outputs.pop("spatial"))
        parts.append(outputs)
        part_labels.append(shard_labels)
    labels = None if part_labels[0] is None else torch.cat(part_labels)
    _score(results, scorer, parts, labels, run.num_samples, stats)


def _score_samples(cfg: DictConfig, plan: EvalPlan, results: dict, scorer, datamodule) -> None:
    """Score existing samples (``samples=``), one batch of images in memory at a time."""
    from lightning.pytorch.utilities import rank_zero_info

    from ..metrics import FeatureStats
    from ..metrics.progress import ProgressLines
    from .generation import open_samples

    source = open_samples(cfg.samples)
    if not plan.sample_metrics:
        return
    if datamodule is not None:
        _check_sample_shape(source.shape, datamodule)
        if source.labels is not None and datamodule.num_classes:  # else class_accuracy would count them as wrong
            from ..data.sources import check_labels

            check_labels(source.labels, datamodule.num_classes, f"samples={cfg.samples} arr_1",
                         advice=f"they are not labels of {datamodule.name}: score against the data set the samples "
                                f"were drawn for (data=<name>)")
    parts, spatial = [], (FeatureStats() if "sfid" in plan.sample_metrics else None)
    progress = ProgressLines(source.count, f"features of {source.count} samples ({', '.join(plan.sample_metrics)})",
                             rank_zero_info)
    for batch in source.batches(int(cfg.batch_size)):
        outputs = scorer.outputs(batch)
        if spatial is not None:
            spatial.update(outputs.pop("spatial"))
        parts.append(outputs)
        progress.update(len(batch))
    _score(results, scorer, parts, source.labels, source.count, spatial)


def _held_out_nll(cfg: DictConfig, module, datamodule) -> dict:
    """``negative_log_likelihood`` on ``nll_images`` held-out images of the data set."""
    datamodule.setup("validate")
    n = min(int(cfg.nll_images), len(datamodule.split_indices("val")))
    if n == 0:
        raise ValueError(f"{datamodule.name} has no held-out images for nll (data.val_size=0)")
    real = datamodule.reference_images("val", n).float() / 127.5 - 1.0
    nll = negative_log_likelihood(module, real, datamodule.reference_labels("val", n), int(cfg.batch_size))
    return {**nll, "nll_images": n}


def _probe(module) -> torch.Tensor:
    """Two blank images of the model's shape: which per-sample outputs the scorer produces."""
    import torch

    return torch.zeros(2, *module.image_shape, dtype=torch.uint8)


def _check_sample_shape(shape: tuple[int, int, int], datamodule) -> None:
    size = (datamodule.image_size, datamodule.image_size)
    channels_ok = shape[0] == datamodule.channels or (datamodule.channels == 1 and shape[0] == 3)
    if tuple(shape[1:]) != size or not channels_ok:
        expected = (datamodule.channels, *size)
        raise ValueError(f"samples are {tuple(shape)} (C, H, W) but {datamodule.name} images "
                         f"are {expected}: evaluate against the data set the model was trained on")


def _score(results: dict, scorer, parts: list, labels: torch.Tensor | None, n: int,
           spatial: FeatureStats | None = None) -> None:
    import torch

    from ..metrics import metric_name

    scores = scorer.score(parts, spatial)
    results["metrics"].update({metric_name(k, n): v for k, v in scores.items()})
    if labels is not None and "clf_logits" in parts[0]:
        predicted = torch.cat([p["clf_logits"] for p in parts]).argmax(1)
        results["metrics"]["class_accuracy"] = float((predicted == labels).float().mean())


def _write_reference(cfg: DictConfig, datamodule, scorer) -> Path:
    """The data source's reference batch in the ADM evaluator's layout (statistics of reference_n images,
    arr_0: the first pr_reference_n of them)."""
    from ..metrics import reference_batches, write_adm_reference

    if cfg.get("reference"):
        raise ValueError("write_reference= writes the data set's own reference batch: drop reference=")
    path = Path(str(cfg.write_reference)).expanduser()
    stats = scorer.reference
    count = min(int(cfg.pr_reference_n), stats.n)
    write_adm_reference(path, stats, reference_batches(datamodule, cfg.reference_split, count), count,
                        datamodule.image_size)
    print(f"reference batch: {path} (statistics of {stats.n} {datamodule.name} images, {count} images in arr_0)")
    return path


def _finish(out_dir: Path, results: dict) -> dict:
    from ..artifacts import write_json

    write_json(out_dir / "results.json", results, default=str)
    print(f"results: {out_dir / 'results.json'}")
    for key, value in results["metrics"].items():
        print(f"  {key}: {value:.4f}" if isinstance(value, float) else f"  {key}: {value}")
    return results


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="eval")
def _hydra_main(cfg: DictConfig) -> None:
    run_cli(evaluate, cfg)


def main() -> None:
    apply_to_command_line()  # sampler= -> method= (deprecated spelling, one warning line)
    check_command_line(typed_keys=False, config_name="eval")  # an unknown key or option: one line, before Hydra
    _hydra_main()


if __name__ == "__main__":
    main()
