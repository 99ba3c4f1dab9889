"""ddpm-sample: generate images from a checkpoint (EMA weights), optionally with classifier(-free) guidance."""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from ..config import CONFIG_PATH
from .errors import run_cli
from .validate import check_command_line


def sample(cfg: DictConfig) -> dict:
    from .generation import generate, load_model_and_guidance, resolve_device, write_json, write_outputs  # torch

    device = resolve_device(cfg.device)
    guidance = OmegaConf.to_container(cfg.guidance)
    module, cond_fn, guide_classes, cfg_scale = load_model_and_guidance(cfg.ckpt, guidance, device)
    images, labels, seconds, used = generate(
        module, num_samples=int(cfg.num_samples), sampler=cfg.sampler, steps=cfg.steps, eta=cfg.eta,
        clip_denoised=bool(cfg.clip_denoised), y=cfg.y, cond_fn=cond_fn, guidance_num_classes=guide_classes,
        cfg_scale=cfg_scale, batch_size=int(cfg.batch_size), seed=int(cfg.seed), precision=str(cfg.precision))
    out_dir = Path(cfg.output_dir)
    outputs = write_outputs(out_dir, images, labels)
    result = {"ckpt": cfg.ckpt, "num_samples": int(cfg.num_samples), "sampling_seconds": seconds,
              "samples_per_second": int(cfg.num_samples) / seconds, "guidance": guidance, "outputs": outputs,
              "sampling": used}
    write_json(out_dir / "sample.json", result)
    print(f"samples: {outputs['samples']}\ngrid: {outputs['grid']}")
    return result


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="sample")
def _hydra_main(cfg: DictConfig) -> None:
    run_cli(sample, cfg)


def main() -> None:
    check_command_line()  # an unknown option (data=..., experiment=...): one line, before Hydra
    _hydra_main()


if __name__ == "__main__":
    main()
