"""ddpm-posthoc-ema: reconstruct EMAs of any length from a run's post-hoc EMA snapshots (EDM2).

Writes one checkpoint per ``sigma_rel`` (``ema_sigma<value>.ckpt``: the run's checkpoint with its EMA
weights replaced) and ``posthoc_ema.json`` (steps, fit errors). ``apply_posthoc_ema`` is what
``ddpm-eval ema_sigma_rel=...`` uses to score a length without writing a checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from ..artifacts import SNAPSHOT_DIR, atomic_torch_save, write_json
from ..config import CONFIG_PATH
from .errors import run_cli
from .validate import MAX_SIGMA_REL, check_command_line, check_sigma_rel

# torch and Lightning are imported inside the functions, once the config is checked (a fast --help)

EMA_PREFIX = "ema.module."
COARSE_FIT = 0.02  # profile L2 error above which the CLI suggests more snapshots


def snapshots_folder(ckpt: str | Path, snapshots: str | Path | None = None) -> Path:
    """``snapshots`` or ``<run>/posthoc_ema`` for a checkpoint at ``<run>/checkpoints/<file>.ckpt``."""
    return Path(snapshots) if snapshots else Path(ckpt).resolve().parent.parent / SNAPSHOT_DIR


def snapshot_step(folder: Path, checkpoint: dict[str, Any], step: int | None) -> int:
    """``step``, or the last snapshot at or before the checkpoint's own step (its EMA's point in the run)."""
    from ..modules.ema import list_snapshots

    if step is not None:
        return int(step)
    ckpt_step = checkpoint.get("global_step")
    return list_snapshots(folder, max_step=None if ckpt_step is None else int(ckpt_step))[-1][0]


def coarse_fit_advice(info: dict[str, Any]) -> str:
    """What to do when a reconstructed length's profile fits worse than ``COARSE_FIT``."""
    return (f"coarse fit for sigma_rel={info['sigma_rel']:.4f} (profile error {info['fit_error']:.2e} > {COARSE_FIT}): "
            f"more snapshots fit better (a smaller ema.posthoc_every_n_steps; ~50 per run give <~5e-3 for sigma_rel "
            f"0.03-0.2), and lengths far outside the snapshotted ones ({info['snapshot_sigma_rels']}) fit worst")


def apply_posthoc_ema(module, ckpt: str | Path, sigma_rel: float, snapshots: str | Path | None = None,
                      step: int | None = None) -> dict[str, Any]:
    """Replace ``module``'s EMA weights by the reconstructed power EMA of length ``sigma_rel`` at ``step``
    (default: the checkpoint's step, see ``snapshot_step``); its summary."""
    from ..modules.checkpoint import load_checkpoint_dict
    from ..modules.ema import reconstruct_ema

    folder = snapshots_folder(ckpt, snapshots)
    if step is None:
        step = snapshot_step(folder, load_checkpoint_dict(ckpt, mmap=True), None)
    state, info = reconstruct_ema(folder, sigma_rel, step=step)
    module.ema.module.load_state_dict({k: v.to(module.device) for k, v in state.items()})
    return info


def write_posthoc_checkpoint(ckpt: str | Path, sigma_rel: float, out_path: str | Path,
                             snapshots: str | Path | None = None, step: int | None = None) -> dict[str, Any]:
    """``ckpt`` with its EMA weights replaced by the power EMA of length ``sigma_rel``, written atomically."""
    from ..modules.checkpoint import load_checkpoint_dict
    from ..modules.ema import reconstruct_ema

    checkpoint = load_checkpoint_dict(ckpt)
    state_dict = checkpoint.get("state_dict") or {}
    if not any(k.startswith(EMA_PREFIX) for k in state_dict):
        raise ValueError(f"checkpoint {ckpt} holds no EMA weights ({EMA_PREFIX}*): is it a ddpm-train diffusion "
                         f"checkpoint?")
    folder = snapshots_folder(ckpt, snapshots)
    ema_state, info = reconstruct_ema(folder, sigma_rel, step=snapshot_step(folder, checkpoint, step))
    expected = {k[len(EMA_PREFIX):] for k in state_dict if k.startswith(EMA_PREFIX)}
    if set(ema_state) != expected:
        missing = sorted(expected ^ set(ema_state))
        raise ValueError(f"the snapshots do not match {ckpt}'s network (first differing tensor: {missing[0]}); "
                         f"use a checkpoint of the run that wrote them")
    for key, value in ema_state.items():
        state_dict[EMA_PREFIX + key] = value
    checkpoint["posthoc_ema"] = info
    return {**info, "ckpt": str(atomic_torch_save(checkpoint, out_path))}


def posthoc_ema(cfg: DictConfig) -> dict[str, Any]:
    values = OmegaConf.to_container(cfg.sigma_rels) if OmegaConf.is_list(cfg.sigma_rels) else [cfg.sigma_rels]
    try:
        sigma_rels = [float(v) for v in values]
    except (TypeError, ValueError):
        raise ValueError(f"sigma_rels={values!r}; give numbers in (0, {MAX_SIGMA_REL:.4f}], "
                         f"e.g. sigma_rels=[0.05,0.1]") from None
    if not sigma_rels:
        raise ValueError("sigma_rels is empty; give the EMA lengths to reconstruct, e.g. sigma_rels=[0.05,0.1]")
    for sigma_rel in sigma_rels:
        check_sigma_rel(sigma_rel, "sigma_rels")
    out_dir = Path(cfg.output_dir)
    step = None if cfg.step is None else int(cfg.step)
    results = []
    for sigma_rel in sigma_rels:
        result = write_posthoc_checkpoint(cfg.ckpt, sigma_rel, out_dir / f"ema_sigma{sigma_rel:.4f}.ckpt",
                                          snapshots=cfg.snapshots, step=step)
        results.append(result)
        print(f"sigma_rel={sigma_rel:.4f} (gamma {result['gamma']:.2f}) at step {result['step']} from "
              f"{result['num_snapshots']} snapshots, profile fit error {result['fit_error']:.2e}: {result['ckpt']}")
        if result["fit_error"] > COARSE_FIT:
            print(f"  {coarse_fit_advice(result)}")
    summary = {"source_ckpt": str(cfg.ckpt), "snapshots": str(snapshots_folder(cfg.ckpt, cfg.snapshots)),
               "results": results}
    write_json(out_dir / "posthoc_ema.json", summary, default=str)
    return summary


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="posthoc_ema")
def _hydra_main(cfg: DictConfig) -> None:
    run_cli(posthoc_ema, cfg)


def main() -> None:
    check_command_line(typed_keys=False, config_name="posthoc_ema")  # an unknown key: one line, before Hydra
    _hydra_main()


if __name__ == "__main__":
    main()
