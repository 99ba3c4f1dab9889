"""Building blocks of the ADM UNet (Dhariwal & Nichol 2021), written as plain ``nn.Module``s.

Sub-module and parameter names follow OpenAI's ``guided_diffusion`` layout (``in_layers``, ``emb_layers``,
``out_layers``, ``skip_connection``, ``qkv``, ``proj_out``, ...) so that official checkpoints map onto these
modules almost one to one (see :mod:`ddpm_lightning.models.adm_checkpoint`). What differs on purpose:

* attention projections are ``nn.Linear`` (the official code uses 1x1 ``Conv1d``), attention itself is
  ``F.scaled_dot_product_attention``;
* gradient checkpointing is ``torch.utils.checkpoint`` (non-reentrant); mixed precision is left to autocast;
* ``ResBlock(rescale=True)`` divides the residual sum by sqrt(2) (the paper's "rescale resblock" ablation).

Every op is torch's own (a forward + backward of the default experiment's UNet with hand-written nearest
upsampling and 1x1-skip kernels measured the same as with torch's ops); every block keeps a channels_last
input channels_last, so ``net.to(memory_format=torch.channels_last)`` works end to end.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

GROUPS = 32  # ADM's normalization(): GroupNorm with 32 groups everywhere


def normalization(channels: int) -> nn.GroupNorm:
    """GroupNorm(32, channels); under autocast torch runs group_norm in float32, as ADM's GroupNorm32 does."""
    return nn.GroupNorm(GROUPS, channels)


def zero_(module: nn.Module) -> nn.Module:
    """Zero every parameter of ``module`` in place and return it."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding [cos(t f_i), sin(t f_i)] with f_i = max_period^(-i/half), shape [N, dim], float32.

    ``t`` is a 1-D tensor of (possibly fractional) timesteps; an odd ``dim`` is padded with one zero column.
    """
    half = dim // 2
    freqs = torch.exp(
        torch.arange(half, device=t.device, dtype=torch.float32) * (-math.log(max_period) / half)
    )
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class TimestepBlock(nn.Module):
    """Marker base class: ``forward(x, emb)`` takes the timestep (+ class) embedding."""


class TimestepSequential(nn.Sequential):
    """``nn.Sequential`` that hands ``emb`` to the children that are :class:`TimestepBlock`s."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        for layer in self:
            x = layer(x, emb) if isinstance(layer, TimestepBlock) else layer(x)
        return x


class Upsample(nn.Module):
    """Nearest-neighbour x2 upsampling, followed by a 3x3 conv when ``use_conv``."""

    def __init__(self, channels: int, use_conv: bool = True, out_channels: int | None = None):
        super().__init__()
        out_channels = out_channels or channels
        if not use_conv and out_channels != channels:
            raise ValueError("Upsample without conv cannot change the channel count; pass use_conv=True")
        self.conv = nn.Conv2d(channels, out_channels, 3, padding=1) if use_conv else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return x if self.conv is None else self.conv(x)


class Downsample(nn.Module):
    """Stride-2 3x3 conv when ``use_conv``, else 2x2 average pooling (attribute ``op`` either way, as ADM)."""

    def __init__(self, channels: int, use_conv: bool = True, out_channels: int | None = None):
        super().__init__()
        out_channels = out_channels or channels
        if use_conv:
            self.op: nn.Module = nn.Conv2d(channels, out_channels, 3, stride=2, padding=1)
        elif out_channels != channels:
            raise ValueError("Downsample without conv cannot change the channel count; pass use_conv=True")
        else:
            self.op = nn.AvgPool2d(kernel_size=2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class ResBlock(TimestepBlock):
    """ADM residual block: GroupNorm-SiLU-conv, embedding injection, GroupNorm-SiLU-dropout-conv (zero init).

    * ``use_scale_shift_norm`` (AdaGN): the embedding gives (scale, shift) and ``h = norm(h) * (1 + scale) +
      shift``; otherwise the embedding is added before the second norm.
    * ``up`` / ``down`` (BigGAN style): the block resamples both branches (nearest x2 / 2x2 average pool)
      between the first SiLU and the first conv.
    * ``rescale``: the output is ``(skip(x) + h) / sqrt(2)``.
    """

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        dropout: float = 0.0,
        out_channels: int | None = None,
        use_scale_shift_norm: bool = False,
        up: bool = False,
        down: bool = False,
        rescale: bool = False,
        use_checkpoint: bool = False,
    ):
        super().__init__()
        out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.use_checkpoint = use_checkpoint
        self.rescale = rescale
        self.in_layers = nn.Sequential(
            normalization(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        if up and down:
            raise ValueError("ResBlock: pass at most one of up=True / down=True")
        if up:
            self.updown: nn.Module | None = Upsample(channels, use_conv=False)
        elif down:
            self.updown = Downsample(channels, use_conv=False)
        else:
            self.updown = None
        self.emb_layers = nn.Sequential(
            nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels if use_scale_shift_norm else out_channels)
        )
        self.out_layers = nn.Sequential(
            normalization(out_channels),
            nn.SiLU(),
            nn.Dropout(dropout),
            zero_(nn.Conv2d(out_channels, out_channels, 3, padding=1)),
        )
        # ADM uses a 1x1 conv when the width changes (its use_conv=False path), identity otherwise.
        self.skip_connection = (
            nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)
        )

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        if self.use_checkpoint and torch.is_grad_enabled():
            return checkpoint(self._forward, x, emb, use_reentrant=False)
        return self._forward(x, emb)

    def _forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        norm_in, act_in, conv_in = self.in_layers
        h = act_in(norm_in(x))
        if self.updown is not None:
            h, x = self.updown(h), self.updown(x)
        h = conv_in(h)
        emb_out = self.emb_layers(emb).to(h.dtype)[:, :, None, None]
        norm_out, act_out, drop, conv_out = self.out_layers
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = torch.addcmul(shift, norm_out(h), 1.0 + scale)
        else:
            h = norm_out(h + emb_out)
        h = conv_out(drop(act_out(h)))
        out = self.skip_connection(x) + h
        return out.mul_(1.0 / math.sqrt(2.0)) if self.rescale else out  # in place: add's backward keeps nothing


def _split_heads(qkv: torch.Tensor, num_heads: int, new_order: bool) -> tuple[torch.Tensor, ...]:
    """[B, T, 3C] -> q, k, v as [B, heads, T, C/heads] views (last dim contiguous, as SDPA prefers).

    ADM's two channel layouts of the fused projection: legacy = (head, qkv, ch), new order = (qkv, head, ch).
    """
    b, t, c3 = qkv.shape
    ch = c3 // (3 * num_heads)
    if new_order:
        q, k, v = qkv.view(b, t, 3, num_heads, ch).unbind(2)
    else:
        q, k, v = qkv.view(b, t, num_heads, 3, ch).unbind(3)
    return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)


class AttentionBlock(nn.Module):
    """Multi-head self-attention over all spatial positions with a residual connection (ADM's AttentionBlock).

    Heads are ``channels // num_head_channels`` when ``num_head_channels != -1``, else ``num_heads``.
    ``use_new_attention_order`` selects how the fused qkv channels are split (see :func:`_split_heads`); the
    two orders compute the same function family but read official weights differently.
    """

    def __init__(
        self,
        channels: int,
        num_heads: int = 1,
        num_head_channels: int = -1,
        use_new_attention_order: bool = False,
        use_checkpoint: bool = False,
    ):
        super().__init__()
        if num_head_channels != -1:
            if num_head_channels <= 0 or channels % num_head_channels:
                raise ValueError(
                    f"num_head_channels={num_head_channels} must divide the attention width {channels}"
                )
            num_heads = channels // num_head_channels
        elif num_heads <= 0 or channels % num_heads:
            raise ValueError(
                f"num_heads={num_heads} must be positive and divide the attention width {channels}"
            )
        self.num_heads = num_heads
        self.new_order = use_new_attention_order
        self.use_checkpoint = use_checkpoint
        self.norm = normalization(channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj_out = zero_(nn.Linear(channels, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_checkpoint and torch.is_grad_enabled():
            return checkpoint(self._forward, x, use_reentrant=False)
        return self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, hgt, wid = x.shape
        h = self.norm(x).flatten(2).transpose(1, 2)  # [B, T, C]
        q, k, v = _split_heads(self.qkv(h), self.num_heads, self.new_order)
        a = F.scaled_dot_product_attention(q, k, v)  # [B, heads, T, ch]
        a = self.proj_out(a.transpose(1, 2).reshape(b, hgt * wid, c))  # [B, T, C]
        return x + a.transpose(1, 2).view(b, c, hgt, wid)


class AttentionPool2d(nn.Module):
    """ADM's attention pooling head (from CLIP): the spatial mean token attends to [mean, all positions].

    ``positional_embedding`` is [C, side^2 + 1] (official layout); heads are ``C // num_head_channels`` and
    the fused qkv uses the new (qkv, head, ch) channel order, as in the official classifier. Only the query of
    the mean token is computed, since only its output is returned.
    """

    def __init__(self, side: int, channels: int, num_head_channels: int, out_channels: int):
        super().__init__()
        if num_head_channels <= 0 or channels % num_head_channels:
            raise ValueError(f"num_head_channels={num_head_channels} must divide the pooled width {channels}")
        self.side = side
        self.num_heads = channels // num_head_channels
        self.positional_embedding = nn.Parameter(torch.randn(channels, side * side + 1) / channels**0.5)
        self.qkv_proj = nn.Linear(channels, 3 * channels)
        self.c_proj = nn.Linear(channels, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, hgt, wid = x.shape
        if hgt * wid + 1 != self.positional_embedding.shape[1]:
            raise ValueError(
                f"AttentionPool2d was built for {self.side}x{self.side} features, got {hgt}x{wid}"
            )
        x = x.flatten(2)
        x = torch.cat([x.mean(dim=-1, keepdim=True), x], dim=-1) + self.positional_embedding.to(x.dtype)
        x = x.transpose(1, 2)  # [B, T+1, C]
        heads, ch = self.num_heads, c // self.num_heads
        w, bias = self.qkv_proj.weight, self.qkv_proj.bias
        q = F.linear(x[:, :1], w[:c], bias[:c]).view(b, 1, heads, ch).transpose(1, 2)
        k, v = F.linear(x, w[c:], bias[c:]).view(b, -1, 2, heads, ch).unbind(2)
        a = F.scaled_dot_product_attention(q, k.transpose(1, 2), v.transpose(1, 2))  # [B, heads, 1, ch]
        return self.c_proj(a.reshape(b, c))
