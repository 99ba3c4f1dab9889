"""ddpm-sample: generate images from a checkpoint (EMA weights), optionally with classifier(-free) guidance.

Samples stream to ``<output_dir>/shards`` (``shards.py``): ``devices=N`` shares them over N processes
(Lightning Fabric, or the processes ``torchrun`` started), Ctrl-C keeps the finished shards, and rerunning
the command with ``hydra.run.dir=<the same folder>`` continues.
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from ..config import CONFIG_PATH
from .errors import run_cli
from .validate import check_command_line


def sample(cfg: DictConfig) -> dict:
    from .generation import keep_finished_shards  # torch: imported once the config is checked

    out_dir = Path(cfg.output_dir)
    return keep_finished_shards(out_dir, lambda: _sample(cfg, out_dir))


def _sample(cfg: DictConfig, out_dir: Path) -> dict:
    from ..artifacts import write_json
    from .generation import generate, load_model_and_guidance, resolve_device
    from .shards import launch

    device = resolve_device(cfg.device)
    procs = launch(int(cfg.devices), device)
    guidance = OmegaConf.to_container(cfg.guidance)
    module, cond_fn, guide_classes, cfg_scale = load_model_and_guidance(cfg.ckpt, guidance, procs.device)
    generated = generate(
        module, out_dir=out_dir, num_samples=int(cfg.num_samples), sampler=cfg.sampler, steps=cfg.steps,
        eta=cfg.eta, clip_denoised=bool(cfg.clip_denoised), y=cfg.y, cond_fn=cond_fn,
        guidance_num_classes=guide_classes, cfg_scale=cfg_scale, batch_size=int(cfg.batch_size), seed=int(cfg.seed),
        precision=str(cfg.precision), schedule=cfg.get("schedule"), shard_size=int(cfg.shard_size), procs=procs,
        settings={"ckpt": str(cfg.ckpt), "guidance": guidance})
    if procs.rank != 0:
        return generated
    gen = generated["generation"]
    result = {"ckpt": cfg.ckpt, "num_samples": int(cfg.num_samples), "sampling_seconds": gen["seconds"],
              "samples_per_second": gen["samples_per_second"], "guidance": guidance,
              "outputs": generated["outputs"], "sampling": generated["sampling"], "generation": gen}
    write_json(out_dir / "sample.json", result, default=str)
    print(f"samples: {result['outputs']['samples']}\ngrid: {result['outputs']['grid']}")
    return result


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="sample")
def _hydra_main(cfg: DictConfig) -> None:
    run_cli(sample, cfg)


def main() -> None:
    check_command_line(typed_keys=False, config_name="sample")  # an unknown key or option: one line, before Hydra
    _hydra_main()


if __name__ == "__main__":
    main()
