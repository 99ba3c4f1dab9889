"""The ADM UNet (Dhariwal & Nichol 2021, OpenAI's ``UNetModel``) with every ablation of the paper as a flag.

The module tree mirrors the official one (``time_embed``, ``label_emb``, ``input_blocks``, ``middle_block``,
``output_blocks``, ``out``), so parameter counts agree part by part and official weights load through a tiny
key map (:mod:`ddpm_lightning.models.adm_checkpoint`). One interface difference: ``attention_resolutions`` are
given in pixels (e.g. ``(32, 16, 8)``), the way ADM's command-line flags give them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .layers import (
    GROUPS,
    AttentionBlock,
    Downsample,
    ResBlock,
    TimestepSequential,
    Upsample,
    normalization,
    timestep_embedding,
    zero_,
)


@dataclass(frozen=True)
class _Plan:
    """Validated shape bookkeeping shared by :class:`UNet` and :class:`EncoderUNet`."""

    channel_mult: tuple[float, ...]
    attention_resolutions: tuple[int, ...]
    widths: tuple[int, ...]  # int(mult * model_channels) per level
    resolutions: tuple[int, ...]  # feature side length per level, image_size // 2**level


def plan_levels(
    image_size: int,
    model_channels: int,
    num_res_blocks: int,
    attention_resolutions: Sequence[int],
    channel_mult: Sequence[float],
    dropout: float,
) -> _Plan:
    """Check the shared constructor arguments; derive per-level widths and resolutions (ValueError if bad)."""
    channel_mult = tuple(channel_mult)
    attention_resolutions = tuple(int(r) for r in attention_resolutions)
    if not channel_mult or any(m <= 0 for m in channel_mult):
        raise ValueError(f"channel_mult must be a non-empty sequence of positive numbers, got {channel_mult}")
    factor = 2 ** (len(channel_mult) - 1)
    if image_size <= 0 or image_size % factor:
        raise ValueError(
            f"image_size={image_size} must be divisible by 2**(len(channel_mult)-1)={factor} "
            f"for channel_mult={channel_mult}"
        )
    if num_res_blocks < 1:
        raise ValueError(f"num_res_blocks must be >= 1, got {num_res_blocks}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    widths = tuple(int(m * model_channels) for m in channel_mult)
    bad = [w for w in widths if w <= 0 or w % GROUPS]
    if bad:
        raise ValueError(
            f"every level width int(mult * model_channels) must be a positive multiple of {GROUPS} "
            f"(GroupNorm groups); got widths {widths} from model_channels={model_channels}, "
            f"channel_mult={channel_mult}"
        )
    resolutions = tuple(image_size >> level for level in range(len(channel_mult)))
    unreachable = sorted(set(attention_resolutions) - set(resolutions), reverse=True)
    if unreachable:
        raise ValueError(
            f"attention_resolutions {unreachable} (pixels) are never reached; allowed: "
            f"{list(resolutions)} for image_size={image_size}, channel_mult={channel_mult}"
        )
    return _Plan(channel_mult, attention_resolutions, widths, resolutions)


def time_embed(model_channels: int) -> nn.Sequential:
    """Sinusoidal features (computed in forward) -> Linear -> SiLU -> Linear, 4 * model_channels wide."""
    emb_dim = 4 * model_channels
    return nn.Sequential(nn.Linear(model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))


def check_heads(plan: _Plan, num_heads: int, num_head_channels: int, what: str = "num_heads") -> None:
    """Every attention width (attention levels and the middle block) must split evenly into heads."""
    attn_widths = {
        w for w, r in zip(plan.widths, plan.resolutions, strict=True) if r in plan.attention_resolutions
    } | {plan.widths[-1]}
    if num_head_channels != -1:
        bad = sorted(w for w in attn_widths if num_head_channels <= 0 or w % num_head_channels)
        if bad:
            raise ValueError(
                f"num_head_channels={num_head_channels} must divide every attention width, "
                f"but not {bad}; pick a divisor of {sorted(attn_widths)} or -1 to use num_heads"
            )
    else:
        bad = sorted(w for w in attn_widths if num_heads <= 0 or w % num_heads)
        if bad:
            raise ValueError(
                f"{what}={num_heads} must divide every attention width, but not {bad}; "
                f"pick a divisor of {sorted(attn_widths)}"
            )


def build_encoder(
    module: nn.Module,
    plan: _Plan,
    in_channels: int,
    model_channels: int,
    num_res_blocks: int,
    dropout: float,
    num_heads: int,
    num_head_channels: int,
    use_scale_shift_norm: bool,
    resblock_updown: bool,
    use_new_attention_order: bool,
    use_checkpoint: bool,
    rescale_resblocks: bool = False,
) -> list[int]:
    """Add ``input_blocks`` and ``middle_block`` to ``module`` as ADM lays them out.

    Returns the channel count of every input block's output (the skip connections, in order).
    """
    emb_dim = 4 * model_channels

    def res(ch_in: int, ch_out: int, **kw: bool) -> ResBlock:
        return ResBlock(
            ch_in,
            emb_dim,
            dropout,
            ch_out,
            use_scale_shift_norm=use_scale_shift_norm,
            rescale=rescale_resblocks,
            use_checkpoint=use_checkpoint,
            **kw,
        )

    def attn(ch: int) -> AttentionBlock:
        return AttentionBlock(ch, num_heads, num_head_channels, use_new_attention_order, use_checkpoint)

    ch = plan.widths[0]
    module.input_blocks = nn.ModuleList([TimestepSequential(nn.Conv2d(in_channels, ch, 3, padding=1))])
    skip_chans = [ch]
    last = len(plan.widths) - 1
    for level, (width, side) in enumerate(zip(plan.widths, plan.resolutions, strict=True)):
        for _ in range(num_res_blocks):
            layers: list[nn.Module] = [res(ch, width)]
            ch = width
            if side in plan.attention_resolutions:
                layers.append(attn(ch))
            module.input_blocks.append(TimestepSequential(*layers))
            skip_chans.append(ch)
        if level != last:
            down = res(ch, ch, down=True) if resblock_updown else Downsample(ch, use_conv=True)
            module.input_blocks.append(TimestepSequential(down))
            skip_chans.append(ch)
    module.middle_block = TimestepSequential(res(ch, ch), attn(ch), res(ch, ch))
    return skip_chans


class UNet(nn.Module):
    """ADM UNet: ``forward(x, t, y=None) -> [N, out_channels, H, W]``.

    Args:
        image_size: input side length; must be divisible by ``2 ** (len(channel_mult) - 1)``.
        in_channels, out_channels: image channels in and out (``out = 2 * in`` for a learned variance).
        model_channels: base width; level ``i`` has ``int(channel_mult[i] * model_channels)`` channels, each a
            multiple of 32 (GroupNorm groups). The time embedding has ``4 * model_channels`` features.
        num_res_blocks: residual blocks per level on the way down (``num_res_blocks + 1`` on the way up).
        attention_resolutions: feature side lengths in pixels where self-attention follows each res block
            (down and up path); the middle block always has attention.
        dropout: dropout in every residual block.
        channel_mult: width multiplier per level; ``len(channel_mult) - 1`` downsamplings.
        num_classes: class-conditional with that many labels (``nn.Embedding`` added to the time embedding).
        num_heads / num_head_channels: heads by count, or by channels per head if ``num_head_channels != -1``.
        num_heads_upsample: heads in the up path when counting heads (``-1``: same as ``num_heads``).
        use_scale_shift_norm: adaptive group norm (AdaGN), ``norm(h) * (1 + scale) + shift`` from ``emb``.
        resblock_updown: BigGAN-style resampling residual blocks instead of strided conv / nearest + conv.
        use_new_attention_order: ADM's split of the fused qkv (q, k, v first, then heads); False = legacy.
        use_checkpoint: gradient checkpointing of every residual and attention block.
        rescale_resblocks: residual sums times 1/sqrt(2) (the paper's "rescale resblock" ablation).
    """

    def __init__(
        self,
        image_size: int,
        in_channels: int,
        model_channels: int,
        out_channels: int,
        num_res_blocks: int,
        attention_resolutions: Sequence[int],
        dropout: float = 0.0,
        channel_mult: Sequence[float] = (1, 2, 2, 2),
        num_classes: int | None = None,
        num_heads: int = 1,
        num_head_channels: int = -1,
        num_heads_upsample: int = -1,
        use_scale_shift_norm: bool = False,
        resblock_updown: bool = False,
        use_new_attention_order: bool = False,
        use_checkpoint: bool = False,
        rescale_resblocks: bool = False,
    ):
        super().__init__()
        plan = plan_levels(
            image_size, model_channels, num_res_blocks, attention_resolutions, channel_mult, dropout
        )
        if num_heads_upsample == -1:
            num_heads_upsample = num_heads
        check_heads(plan, num_heads, num_head_channels)
        check_heads(plan, num_heads_upsample, num_head_channels, what="num_heads_upsample")
        if num_classes is not None and (isinstance(num_classes, bool) or int(num_classes) < 1):
            raise ValueError(
                f"num_classes must be None (unconditional) or a positive int, got {num_classes!r}"
            )
        if in_channels < 1 or out_channels < 1:
            raise ValueError(f"in_channels and out_channels must be >= 1, got {in_channels}, {out_channels}")
        self.image_size = image_size
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.model_channels = model_channels
        self.num_classes = None if num_classes is None else int(num_classes)
        self.channel_mult = plan.channel_mult
        self.attention_resolutions = plan.attention_resolutions

        self.time_embed = time_embed(model_channels)
        if self.num_classes is not None:
            self.label_emb = nn.Embedding(self.num_classes, 4 * model_channels)
        skip_chans = build_encoder(
            self,
            plan,
            in_channels,
            model_channels,
            num_res_blocks,
            dropout,
            num_heads,
            num_head_channels,
            use_scale_shift_norm,
            resblock_updown,
            use_new_attention_order,
            use_checkpoint,
            rescale_resblocks,
        )

        emb_dim = 4 * model_channels
        ch = plan.widths[-1]
        self.output_blocks = nn.ModuleList()
        for level in reversed(range(len(plan.widths))):
            width, side = plan.widths[level], plan.resolutions[level]
            for i in range(num_res_blocks + 1):
                layers: list[nn.Module] = [
                    ResBlock(
                        ch + skip_chans.pop(),
                        emb_dim,
                        dropout,
                        width,
                        use_scale_shift_norm=use_scale_shift_norm,
                        rescale=rescale_resblocks,
                        use_checkpoint=use_checkpoint,
                    )
                ]
                ch = width
                if side in plan.attention_resolutions:
                    layers.append(
                        AttentionBlock(
                            ch, num_heads_upsample, num_head_channels, use_new_attention_order, use_checkpoint
                        )
                    )
                if level and i == num_res_blocks:
                    layers.append(
                        ResBlock(
                            ch,
                            emb_dim,
                            dropout,
                            ch,
                            use_scale_shift_norm=use_scale_shift_norm,
                            up=True,
                            rescale=rescale_resblocks,
                            use_checkpoint=use_checkpoint,
                        )
                        if resblock_updown
                        else Upsample(ch, use_conv=True)
                    )
                self.output_blocks.append(TimestepSequential(*layers))
        self.out = nn.Sequential(
            normalization(ch), nn.SiLU(), zero_(nn.Conv2d(ch, out_channels, 3, padding=1))
        )

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` [N, C, H, W], ``t`` [N] (or scalar) timesteps, ``y`` [N] int labels iff class-conditional."""
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        emb = self.time_embed(timestep_embedding(t, self.model_channels).to(self.time_embed[0].weight.dtype))
        if self.num_classes is not None:
            if y is None:
                raise ValueError(
                    f"this UNet is class-conditional (num_classes={self.num_classes}): pass y, "
                    "an integer tensor of shape [N]"
                )
            if y.shape != (x.shape[0],):
                raise ValueError(f"y must have shape [N]=[{x.shape[0]}], got {list(y.shape)}")
            emb = emb + self.label_emb(y)
        elif y is not None:
            raise ValueError("this UNet is unconditional (num_classes=None): call it without y")
        hs = []
        h = x
        for block in self.input_blocks:
            h = block(h, emb)
            hs.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, hs.pop()], dim=1), emb)
        return self.out(h)
