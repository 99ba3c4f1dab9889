"""ADM's noisy classifier (``EncoderUNetModel``): the UNet's downsampling half and middle block + a pool."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .layers import AttentionPool2d, normalization, timestep_embedding, zero_
from .unet import build_encoder, check_heads, plan_levels, time_embed

POOLS = ("adaptive", "attention", "spatial", "spatial_v2")


class EncoderUNet(nn.Module):
    """Noisy-image classifier ``forward(x, t) -> logits [N, out_channels]`` (ADM's EncoderUNetModel).

    Constructor flags are those of the UNet (same meaning, ``attention_resolutions`` in pixels) plus ``pool``:

    * ``"attention"``: GroupNorm-SiLU-AttentionPool2d (CLIP-style attention pooling; ADM's classifiers). Needs
      ``num_head_channels != -1``; the head is tied to ``image_size``.
    * ``"adaptive"``: GroupNorm-SiLU-global average pool-zero-initialised 1x1 conv.
    * ``"spatial"`` / ``"spatial_v2"``: spatial means of every input block and of the middle block,
      concatenated, then an MLP (Linear-ReLU-Linear / Linear-GroupNorm-SiLU-Linear, 2048 hidden).
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
        channel_mult: Sequence[float] = (1, 2, 4, 8),
        use_checkpoint: bool = False,
        num_heads: int = 1,
        num_head_channels: int = -1,
        use_scale_shift_norm: bool = False,
        resblock_updown: bool = False,
        use_new_attention_order: bool = False,
        pool: str = "adaptive",
    ):
        super().__init__()
        if pool not in POOLS:
            raise ValueError(f"unknown pool {pool!r}; allowed: {', '.join(POOLS)}")
        plan = plan_levels(
            image_size, model_channels, num_res_blocks, attention_resolutions, channel_mult, dropout
        )
        check_heads(plan, num_heads, num_head_channels)
        if pool == "attention" and num_head_channels == -1:
            raise ValueError(
                "pool='attention' needs num_head_channels != -1 (e.g. 64), as in ADM's classifiers"
            )
        if in_channels < 1 or out_channels < 1:
            raise ValueError(f"in_channels and out_channels must be >= 1, got {in_channels}, {out_channels}")
        self.image_size = image_size
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.model_channels = model_channels
        self.channel_mult = plan.channel_mult
        self.attention_resolutions = plan.attention_resolutions
        self.pool = pool

        self.time_embed = time_embed(model_channels)
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
        )
        ch = plan.widths[-1]
        feature_size = sum(skip_chans) + ch
        if pool == "adaptive":
            self.out = nn.Sequential(
                normalization(ch),
                nn.SiLU(),
                nn.AdaptiveAvgPool2d((1, 1)),
                zero_(nn.Conv2d(ch, out_channels, 1)),
                nn.Flatten(),
            )
        elif pool == "attention":
            self.out = nn.Sequential(
                normalization(ch),
                nn.SiLU(),
                AttentionPool2d(plan.resolutions[-1], ch, num_head_channels, out_channels),
            )
        elif pool == "spatial":
            self.out = nn.Sequential(nn.Linear(feature_size, 2048), nn.ReLU(), nn.Linear(2048, out_channels))
        else:
            self.out = nn.Sequential(
                nn.Linear(feature_size, 2048), normalization(2048), nn.SiLU(), nn.Linear(2048, out_channels)
            )

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``x`` [N, C, H, W], ``t`` [N] (or a scalar) timesteps -> logits [N, out_channels]."""
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        emb = self.time_embed(timestep_embedding(t, self.model_channels).to(self.time_embed[0].weight.dtype))
        spatial = self.pool.startswith("spatial")
        feats = []
        h = x
        for block in self.input_blocks:
            h = block(h, emb)
            if spatial:
                feats.append(h.mean(dim=(2, 3)))
        h = self.middle_block(h, emb)
        if spatial:
            feats.append(h.mean(dim=(2, 3)))
            return self.out(torch.cat(feats, dim=-1))
        return self.out(h)
