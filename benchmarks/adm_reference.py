"""A "straightforward ADM implementation" for the benchmarks: our UNet with the official code's choices.

OpenAI's guided-diffusion computes the same function as our UNet but with:

* attention as 1x1 ``conv1d`` projections on [B, C, T] and an explicit ``softmax(q k^T) v`` (``QKVAttention`` /
  ``QKVAttentionLegacy``, q and k each scaled by ch^-1/4, softmax in float32);
* gradient checkpointing always on in every attention block (``checkpoint(..., True)``), whatever
  ``use_checkpoint`` says;
* ``F.interpolate(scale_factor=2, mode="nearest")`` for upsampling;
* AdaGN as ``norm(h) * (1 + scale) + shift`` and the embedding reshaped with a ``while`` loop.

:func:`straightforward_adm` re-classes the blocks of a built :class:`~ddpm_lightning.models.UNet` in place, so
the weights (and thus the outputs, up to float rounding) are the same as ours. Benchmark-only: the library
never imports this module.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ddpm_lightning.models import UNet
from ddpm_lightning.models.layers import AttentionBlock, ResBlock, Upsample


def qkv_attention(qkv: torch.Tensor, heads: int, new_order: bool) -> torch.Tensor:
    """ADM's QKVAttention (new order) / QKVAttentionLegacy on [B, 3 * heads * ch, T] -> [B, heads * ch, T]."""
    bs, width, length = qkv.shape
    ch = width // (3 * heads)
    if new_order:
        q, k, v = qkv.chunk(3, dim=1)
        q, k, v = (z.reshape(bs * heads, ch, length) for z in (q, k, v))
    else:
        q, k, v = qkv.reshape(bs * heads, ch * 3, length).split(ch, dim=1)
    scale = 1 / math.sqrt(math.sqrt(ch))
    weight = torch.einsum("bct,bcs->bts", q * scale, k * scale)
    weight = torch.softmax(weight.float(), dim=-1).type(weight.dtype)
    return torch.einsum("bts,bcs->bct", weight, v).reshape(bs, -1, length)


class ReferenceAttention(AttentionBlock):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():  # the official AttentionBlock checkpoints unconditionally
            return checkpoint(self._forward, x, use_reentrant=False)
        return self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)
        qkv = F.conv1d(self.norm(x), self.qkv.weight[:, :, None], self.qkv.bias)
        h = qkv_attention(qkv, self.num_heads, self.new_order)
        h = F.conv1d(h, self.proj_out.weight[:, :, None], self.proj_out.bias)
        return (x + h).reshape(b, c, *spatial)


class ReferenceUpsample(Upsample):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return x if self.conv is None else self.conv(x)


class ReferenceResBlock(ResBlock):
    def _forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.updown is not None:
            in_rest, in_conv = self.in_layers[:-1], self.in_layers[-1]
            h = in_rest(x)
            h, x = self.updown(h), self.updown(x)
            h = in_conv(h)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).type(h.dtype)
        while len(emb_out.shape) < len(h.shape):
            emb_out = emb_out[..., None]
        if self.use_scale_shift_norm:
            out_norm, out_rest = self.out_layers[0], self.out_layers[1:]
            scale, shift = torch.chunk(emb_out, 2, dim=1)
            h = out_norm(h) * (1 + scale) + shift
            h = out_rest(h)
        else:
            h = self.out_layers(h + emb_out)
        out = self.skip_connection(x) + h
        return out / math.sqrt(2.0) if self.rescale else out


_SWAP = {AttentionBlock: ReferenceAttention, Upsample: ReferenceUpsample, ResBlock: ReferenceResBlock}


def straightforward_adm(model: UNet) -> UNet:
    """Turn ``model``'s attention, upsampling and residual blocks into the reference ones (in place)."""
    for module in model.modules():
        new = _SWAP.get(type(module))
        if new is not None:
            module.__class__ = new
    return model


def build_reference(config_unet: dict) -> nn.Module:
    return straightforward_adm(UNet(**config_unet))
