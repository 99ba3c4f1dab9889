"""EMA of network weights through ``torch.optim.swa_utils.AveragedModel``.

The warm-up form decay_n = min(decay, (1 + n) / (10 + n)) lets short runs use a meaningful average
(with decay 0.9999 and no warm-up, a 2k-step run would still be mostly its initial weights).

Post-hoc EMA (EDM2, ``ema.posthoc_sigma_rels``): power-function EMAs tracked beside it (also AveragedModels,
so they are in the state dict and resume exactly), whose snapshots every ``ema.posthoc_every_n_steps`` are
written to ``<run>/posthoc_ema/`` by ``callbacks.PostHocEMASnapshots``; ``reconstruct_ema`` combines them
into an EMA of any length (``ddpm-posthoc-ema``, ``ddpm-eval ema_sigma_rel=...``). Snapshot files hold
tensors and primitives only (``torch.load(..., weights_only=True)``) and are written atomically.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from ..artifacts import atomic_torch_save
from ..diffusion.posthoc_ema import (
    combine_state_dicts,
    gamma_to_sigma_rel,
    power_ema_weight,
    sigma_rel_to_gamma,
    solve_posthoc_weights,
)

SNAPSHOT_FORMAT = "ddpm_lightning.posthoc_ema/1"
SNAPSHOT_PATTERN = re.compile(r"^snapshot-(\d+)\.pt$")


class EMAUpdate:
    """``multi_avg_fn`` for AveragedModel: a picklable callable (DDP spawn pickles the module)."""

    def __init__(self, decay: float, warmup: bool) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"ema.decay must lie in [0, 1], got {decay}")
        self.decay = float(decay)
        self.warmup = bool(warmup)

    @torch.no_grad()
    def __call__(self, ema_params: list[torch.Tensor], params: list[torch.Tensor], num_averaged) -> None:
        device = ema_params[0].device
        if self.warmup:  # stays a tensor: no host-device sync per step
            n = torch.as_tensor(num_averaged, dtype=torch.float32, device=device)
            weight = 1.0 - torch.clamp((1.0 + n) / (10.0 + n), max=self.decay)
        else:
            weight = torch.tensor(1.0 - self.decay, device=device)
        lerp_parameters(ema_params, params, weight)


def lerp_parameters(ema_params: list[torch.Tensor], params: list[torch.Tensor], weight: torch.Tensor) -> None:
    """``ema += weight * (param - ema)`` for the floating-point tensors (one fused foreach call); integer
    buffers (BatchNorm counters, ...) are copied."""
    floats = [(e, p) for e, p in zip(ema_params, params, strict=True) if e.is_floating_point()]
    if floats:
        ema_f, cur_f = zip(*floats, strict=True)
        torch._foreach_lerp_(list(ema_f), list(cur_f), weight.to(ema_f[0].dtype))
    for e, p in zip(ema_params, params, strict=True):
        if not e.is_floating_point():
            e.copy_(p)


def make_ema(net: nn.Module, decay: float = 0.9999, warmup: bool = True) -> AveragedModel:
    """An AveragedModel holding the EMA copy of ``net`` (buffers averaged too, no gradients)."""
    ema = AveragedModel(net, multi_avg_fn=EMAUpdate(decay, warmup), use_buffers=True)
    ema.requires_grad_(False)
    ema.eval()
    return ema


# ---------------------------------------------------------------------------------------------- post-hoc EMA
class PowerEMAUpdate:
    """``multi_avg_fn`` for AveragedModel: the power-function EMA of exponent ``gamma`` (EDM2).

    AveragedModel copies the weights at its first update (t = 1, beta = 0) and calls this from the second
    on with ``num_averaged`` = t - 1; picklable (DDP spawn pickles the module).
    """

    def __init__(self, gamma: float) -> None:
        self.gamma = float(gamma)

    @torch.no_grad()
    def __call__(self, ema_params: list[torch.Tensor], params: list[torch.Tensor], num_averaged) -> None:
        device = ema_params[0].device
        t = torch.as_tensor(num_averaged, device=device) + 1
        weight = power_ema_weight(t, self.gamma)  # a tensor: no host-device sync per step
        lerp_parameters(ema_params, params, weight)


def make_power_ema(net: nn.Module, sigma_rel: float) -> AveragedModel:
    """An AveragedModel tracking the power-function EMA of relative length ``sigma_rel``."""
    ema = AveragedModel(net, multi_avg_fn=PowerEMAUpdate(sigma_rel_to_gamma(sigma_rel)), use_buffers=True)
    ema.requires_grad_(False)
    ema.eval()
    return ema


def make_posthoc_emas(net: nn.Module, sigma_rels: Sequence[float] | None, every_n_steps: int) -> nn.ModuleList:
    """The power EMAs of ``ema.posthoc_sigma_rels`` (an empty list: post-hoc EMA off, no state-dict keys)."""
    sigma_rels = [float(s) for s in (sigma_rels or [])]
    for sigma_rel in sigma_rels:
        sigma_rel_to_gamma(sigma_rel)  # validates the range
    if sigma_rels and int(every_n_steps) < 1:
        raise ValueError(f"ema.posthoc_every_n_steps must be >= 1 when ema.posthoc_sigma_rels is set, "
                         f"got {every_n_steps}")
    if len(set(sigma_rels)) != len(sigma_rels):
        raise ValueError(f"ema.posthoc_sigma_rels has duplicates: {sigma_rels}")
    return nn.ModuleList(make_power_ema(net, s) for s in sigma_rels)


def posthoc_gammas(emas: nn.ModuleList) -> list[float]:
    return [float(ema.multi_avg_fn.gamma) for ema in emas]


def save_snapshot(folder: str | Path, emas: nn.ModuleList, global_step: int) -> Path:
    """``folder/snapshot-<step>.pt``: every power EMA's network weights at its update count ``step``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    steps = {int(ema.n_averaged) for ema in emas}
    if len(steps) != 1:
        raise ValueError(f"the post-hoc EMAs disagree on their update count: {sorted(steps)}")
    step = steps.pop()
    gammas = posthoc_gammas(emas)
    payload = {"format": SNAPSHOT_FORMAT, "step": step, "global_step": int(global_step), "gammas": gammas,
               "sigma_rels": [gamma_to_sigma_rel(g) for g in gammas],
               "ema": [{k: v.detach().cpu().clone() for k, v in ema.module.state_dict().items()} for ema in emas]}
    path = folder / f"snapshot-{step:07d}.pt"
    return atomic_torch_save(payload, path)


def _load_snapshot(path: Path, mmap: bool = True) -> dict[str, Any]:
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as error:  # noqa: BLE001 - any unreadable file gets one line naming it
        raise ValueError(f"post-hoc EMA snapshot {path} is unreadable ({type(error).__name__}); "
                         f"delete it or restore it") from None
    if not isinstance(payload, dict) or payload.get("format") != SNAPSHOT_FORMAT:
        raise ValueError(f"{path} is not a post-hoc EMA snapshot ({SNAPSHOT_FORMAT})")
    return payload


def list_snapshots(folder: str | Path, max_step: int | None = None) -> list[tuple[int, Path]]:
    """(update count, path) of the snapshots in ``folder`` (up to ``max_step``), in step order."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"no post-hoc EMA snapshots folder {folder}; train with "
                                f"ema.posthoc_sigma_rels=[0.05,0.1] to write one")
    found = sorted((int(m.group(1)), folder / name) for name in os.listdir(folder)
                   if (m := SNAPSHOT_PATTERN.match(name)))
    found = [(step, path) for step, path in found if max_step is None or step <= max_step]
    if not found:
        raise FileNotFoundError(f"no post-hoc EMA snapshots in {folder}"
                                + (f" up to step {max_step}" if max_step is not None else ""))
    return found


def reconstruct_ema(folder: str | Path, sigma_rel: float, step: int | None = None
                    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The network weights of the power EMA of relative length ``sigma_rel`` at ``step`` (default: the last
    snapshot's step), combined from the snapshots in ``folder``; plus a summary (steps used, fit error)."""
    gamma = sigma_rel_to_gamma(float(sigma_rel))
    snapshots = list_snapshots(folder, max_step=step)
    target_step = snapshots[-1][0] if step is None else int(step)
    if target_step != snapshots[-1][0]:  # the weights after the last snapshot before it are unknown
        raise ValueError(f"no snapshot at step {target_step} in {folder} (the last one before it: step "
                         f"{snapshots[-1][0]}); give step= one of the snapshot steps, or null for the last")
    meta = [(s, path, _load_snapshot(path)["gammas"]) for s, path in snapshots]
    columns = [(s, path, i, g) for s, path, gammas in meta for i, g in enumerate(gammas)]
    weights, fit_error = solve_posthoc_weights([c[0] for c in columns], [c[3] for c in columns], target_step, gamma)

    def states() -> Iterator[dict[str, torch.Tensor]]:
        for _, path, index, _ in columns:  # one memory-mapped snapshot at a time
            yield _load_snapshot(path)["ema"][index]

    state = combine_state_dicts(states(), weights.tolist())
    info = {"sigma_rel": float(sigma_rel), "gamma": gamma, "step": target_step, "num_snapshots": len(snapshots),
            "snapshot_sigma_rels": sorted({round(gamma_to_sigma_rel(c[3]), 6) for c in columns}),
            "fit_error": fit_error}
    return state, info
