"""ddpm-eval: score a checkpoint (or existing samples) with FID / KID / precision-recall / IS and NLL.

Writes ``results.json``, ``grid.png`` and ``samples.npz`` (ADM evaluator layout) into the run folder.
"""

from __future__ import annotations

from pathlib import Path

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from ..callbacks.generative_metrics import make_generative_metrics
from ..config import CONFIG_PATH
from ..metrics import metric_name, to_uint8
from .errors import run_cli
from .generation import generate, load_model_and_guidance, load_samples, resolve_device, write_json, write_outputs
from .required_keys import missing_keys, missing_keys_message
from .validate import check_command_line

NUM_QUARTILES = 4


@torch.no_grad()
def negative_log_likelihood(module, images: torch.Tensor, labels: torch.Tensor | None,
                            batch_size: int) -> dict[str, float]:
    """Exact VLB in bits/dim (full T-step loop) on held-out images, with its prior / decoder / quartile parts."""
    diffusion, net = module.diffusion, module.ema_net
    totals, priors, decoders, quartiles = [], [], [], []
    steps = diffusion.num_timesteps
    for start in range(0, len(images), batch_size):
        x = images[start:start + batch_size].to(module.device)
        kwargs = {}
        if module.num_classes is not None and labels is not None:
            kwargs["y"] = labels[start:start + batch_size].to(module.device)
        out = diffusion.calc_bpd_loop(net, x, clip_denoised=True, model_kwargs=kwargs)
        totals.append(out["total_bpd"])
        priors.append(out["prior_bpd"])
        decoders.append(out["vb"][:, 0])
        bounds = [round(q * steps / NUM_QUARTILES) for q in range(NUM_QUARTILES + 1)]
        quartiles.append(torch.stack([out["vb"][:, bounds[q]:bounds[q + 1]].sum(1) for q in range(NUM_QUARTILES)], 1))
    quartile_means = torch.cat(quartiles).mean(0)
    return {"nll_bpd": float(torch.cat(totals).mean()), "nll_prior_bpd": float(torch.cat(priors).mean()),
            "nll_decoder_bpd": float(torch.cat(decoders).mean()),
            **{f"nll_vb_q{q}_bpd": float(quartile_means[q]) for q in range(NUM_QUARTILES)}}


def evaluate(cfg: DictConfig) -> dict:
    missing = missing_keys(cfg)  # also checked by a Hydra callback; here for evaluate() called directly
    if missing:
        raise ValueError(missing_keys_message(missing))
    if not cfg.ckpt and not cfg.samples:
        raise ValueError("give ckpt=<a ddpm-train checkpoint> or samples=<an .npz or image folder> to evaluate")
    device = resolve_device(cfg.device)
    metrics = list(cfg.metrics)
    sample_metrics = [m for m in metrics if m != "nll"]
    out_dir = Path(cfg.output_dir)
    results: dict = {"ckpt": cfg.ckpt, "samples": cfg.samples, "metrics": {}}
    module = None
    if cfg.ckpt:
        guidance = OmegaConf.to_container(cfg.guidance)
        module, cond_fn, guide_classes, cfg_scale = load_model_and_guidance(cfg.ckpt, guidance, device)
        data_cfg = cfg.data if cfg.get("data") else module.run_config.get("data")
        if not data_cfg:
            raise ValueError(f"{cfg.ckpt} stores no data config; pass data=<name> for the reference images")
        results["guidance"] = guidance
    else:
        if "nll" in metrics:
            raise ValueError("metrics=[nll] needs a model: give ckpt=...")
        if not cfg.get("data"):
            raise ValueError("samples=... needs data=<name> (e.g. data=animal_mnist) for the reference statistics")
        data_cfg = cfg.data
    datamodule = instantiate(data_cfg)

    if cfg.ckpt and (sample_metrics or not metrics):
        images, labels, seconds, results["sampling"] = generate(
            module, num_samples=int(cfg.num_samples), sampler=cfg.sampler, steps=cfg.steps, eta=cfg.eta,
            clip_denoised=bool(cfg.clip_denoised), y=cfg.y, cond_fn=cond_fn, guidance_num_classes=guide_classes,
            cfg_scale=cfg_scale, batch_size=int(cfg.batch_size), seed=int(cfg.seed), precision=str(cfg.precision))
        results["outputs"] = write_outputs(out_dir, images, labels)
        results["sampling_seconds"] = seconds
        results["samples_per_second"] = len(images) / seconds
        samples_uint8 = to_uint8(images)
    elif cfg.samples:
        samples_uint8, labels = load_samples(cfg.samples)
    if sample_metrics:
        expected = (datamodule.channels, datamodule.image_size, datamodule.image_size)
        if tuple(samples_uint8.shape[1:]) != expected:
            raise ValueError(f"samples are {tuple(samples_uint8.shape[1:])} (C, H, W) but {datamodule.name} images "
                             f"are {expected}: evaluate against the data set the model was trained on")
        scorer = make_generative_metrics(datamodule, metrics=sample_metrics, feature=cfg.feature,
                                         weights_path=cfg.weights_path, reference_split=cfg.reference_split,
                                         reference_n=int(cfg.reference_n), cache_dir=cfg.cache_dir,
                                         classifier_epochs=int(cfg.classifier_epochs),
                                         batch_size=int(cfg.batch_size), device=device, progress=True)
        scores = scorer.compute(samples_uint8)
        results["metrics"].update({metric_name(k, len(samples_uint8)): v for k, v in scores.items()})
        if labels is not None and scorer.classifier is not None:
            from ..metrics import classify

            predicted = classify(scorer.classifier, samples_uint8).argmax(1)
            results["metrics"]["class_accuracy"] = float((predicted == labels).float().mean())
    if "nll" in metrics:
        datamodule.setup("validate")
        n = min(int(cfg.nll_images), len(datamodule.split_indices("val")))
        if n == 0:
            raise ValueError(f"{datamodule.name} has no held-out images for nll (data.val_size=0)")
        real = datamodule.reference_images("val", n).float() / 127.5 - 1.0
        results["metrics"].update(negative_log_likelihood(module, real, datamodule.reference_labels("val", n),
                                                          int(cfg.batch_size)))
        results["metrics"]["nll_images"] = n
    write_json(out_dir / "results.json", results)
    print(f"results: {out_dir / 'results.json'}")
    for key, value in results["metrics"].items():
        print(f"  {key}: {value:.4f}" if isinstance(value, float) else f"  {key}: {value}")
    return results


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="eval")
def _hydra_main(cfg: DictConfig) -> None:
    run_cli(evaluate, cfg)


def main() -> None:
    check_command_line()  # an unknown option (data=..., experiment=...): one line, before Hydra
    _hydra_main()


if __name__ == "__main__":
    main()
