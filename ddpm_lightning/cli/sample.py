"""ddpm-sample: generate images from a checkpoint (EMA weights), optionally with classifier(-free) guidance.

Samples stream to ``<output_dir>/shards`` (``shards.py``): ``devices=N`` shares them over N processes
(Lightning Fabric, or the processes ``torchrun`` started), Ctrl-C keeps the finished shards, and rerunning
the command with ``hydra.run.dir=<the same folder>`` continues.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import hydra
from omegaconf import DictConfig

from ..config import CONFIG_PATH
from .deprecated import apply_to_command_line
from .errors import run_cli
from .validate import check_command_line


def sample(cfg: DictConfig) -> dict:
    from .console import quiet_console
    from .generation import keep_finished_shards  # torch: imported once the config is checked

    quiet_console()  # one line per event: one log handler, no third-party tips
    out_dir = Path(cfg.output_dir)
    return keep_finished_shards(out_dir, lambda: _sample(cfg, out_dir))


def _sample(cfg: DictConfig, out_dir: Path) -> dict:
    from ..artifacts import write_json
    from ..provenance import provenance
    from .generation import generate, plan_generation, resolve_device, sampling_time
    from .shards import launch

    procs = launch(int(cfg.devices), resolve_device(cfg.device))
    module, run = plan_generation(cfg, out_dir, procs.device)
    generated = generate(module, run, procs=procs)
    if procs.rank != 0:  # the other processes generate their shards; rank 0 writes the outputs
        return generated
    gen = generated["generation"]
    result = {"ckpt": cfg.ckpt, "num_samples": run.num_samples, **sampling_time(gen),
              "guidance": dataclasses.asdict(run.guidance_config),
              "outputs": generated["outputs"], "sampling": generated["sampling"], "generation": gen}
    result["provenance"] = provenance(precision=run.precision, world_size=procs.world_size)
    write_json(out_dir / "sample.json", result, default=str)
    print(f"samples: {result['outputs']['samples']}\ngrid: {result['outputs']['grid']}")
    return result


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="sample")
def _hydra_main(cfg: DictConfig) -> None:
    run_cli(sample, cfg)


def main() -> None:
    apply_to_command_line()  # sampler= -> method= (deprecated spelling, one warning line)
    check_command_line(typed_keys=False, config_name="sample")  # an unknown key or option: one line, before Hydra
    _hydra_main()


if __name__ == "__main__":
    main()
