"""EMA of network weights through ``torch.optim.swa_utils.AveragedModel``.

The warm-up form decay_n = min(decay, (1 + n) / (10 + n)) lets short runs use a meaningful average
(with decay 0.9999 and no warm-up, a 2k-step run would still be mostly its initial weights).
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel


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


def copy_for_inference(module: nn.Module) -> nn.Module:
    """A detached eval-mode copy (used where the caller must not see later training updates)."""
    clone = copy.deepcopy(module)
    clone.requires_grad_(False)
    return clone.eval()
