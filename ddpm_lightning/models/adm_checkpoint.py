"""Load OpenAI guided-diffusion (ADM) checkpoints into :class:`UNet` / :class:`EncoderUNet`.

Our module tree keeps ADM's names, so the key map is the identity on names; what changes is the layout of
the attention projections, which ADM stores as 1x1 ``Conv1d`` and we hold as ``nn.Linear``. The full map,
official key pattern -> ours (``{blk}``: ``input_blocks.{i}.{j}``, ``middle_block.{j}``,
``output_blocks.{i}.{j}``):

==============================================  ==================  ===========
official key                                    ours                tensor
==============================================  ==================  ===========
``time_embed.{0,2}.{weight,bias}``              same                same
``label_emb.weight``                            same                same
``input_blocks.0.0.{weight,bias}`` (stem conv)  same                same
``{blk}.in_layers.{0,2}.{weight,bias}``         same                same
``{blk}.emb_layers.1.{weight,bias}``            same                same
``{blk}.out_layers.{0,3}.{weight,bias}``        same                same
``{blk}.skip_connection.{weight,bias}``         same                same
``{blk}.op.{weight,bias}`` (Downsample conv)    same                same
``{blk}.conv.{weight,bias}`` (Upsample conv)    same                same
``{blk}.norm.{weight,bias}`` (attention norm)   same                same
``{blk}.qkv.weight`` [3C, C, 1]                 same name, [3C, C]  squeeze(-1)
``{blk}.proj_out.weight`` [C, C, 1]             same name, [C, C]   squeeze(-1)
``{blk}.{qkv,proj_out}.bias``                   same                same
``out.{0..3}.{weight,bias}`` (UNet/pool heads)  same                same
``out.2.positional_embedding`` [C, S*S+1]       same                same
``out.2.{qkv_proj,c_proj}.weight`` [O, C, 1]    same name, [O, C]   squeeze(-1)
``out.2.{qkv_proj,c_proj}.bias``                same                same
==============================================  ==================  ===========

The channel order inside ``qkv`` (legacy vs new attention order) is not touched: the model built with the
checkpoint's ``use_new_attention_order`` reads it as ADM does. Every tensor is shape-checked against the
target module; any difference (usually: flags that differ from the checkpoint's) is a ValueError naming the
first differing tensor with both shapes, plus the first missing and unexpected keys.

The flags of the published checkpoints (:data:`ADM_PRESETS`) and the translation of ADM's command-line flags
into our constructor arguments (:func:`adm_model_config`) live in ``ddpm_lightning/adm_flags.py`` (no torch, for
``ddpm-convert-adm``'s fast start) and are re-exported here.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import nn

from ..adm_flags import (  # noqa: F401  re-exported: the flags belong with the weights they describe
    ADM_CHANNEL_MULT,
    ADM_CLASSIFIER_DEFAULTS,
    ADM_DIFFUSION_DEFAULTS,
    ADM_MODEL_DEFAULTS,
    ADM_NUM_CLASSES,
    ADM_PRESETS,
    KINDS,
    adm_model_config,
)
from .state_dict import state_dict_mismatch

_BLOCK = r"(?:input_blocks\.\d+\.\d+|middle_block\.\d+|output_blocks\.\d+\.\d+)"
_PARAM = r"\.(?:weight|bias)"
# (pattern, is a 1x1-conv weight that we hold as a Linear weight)
KEY_MAP: tuple[tuple[re.Pattern[str], bool], ...] = tuple(
    (re.compile(p), conv1x1)
    for p, conv1x1 in (
        (r"time_embed\.[02]" + _PARAM, False),
        (r"label_emb\.weight", False),
        (r"input_blocks\.0\.0" + _PARAM, False),
        (
            _BLOCK
            + r"\.(?:in_layers\.[02]|emb_layers\.1|out_layers\.[03]|skip_connection|op|conv|norm)"
            + _PARAM,
            False,
        ),
        (_BLOCK + r"\.(?:qkv|proj_out)\.weight", True),
        (_BLOCK + r"\.(?:qkv|proj_out)\.bias", False),
        (r"out\.\d" + _PARAM, False),
        (r"out\.2\.positional_embedding", False),
        (r"out\.2\.(?:qkv_proj|c_proj)\.weight", True),
        (r"out\.2\.(?:qkv_proj|c_proj)\.bias", False),
    )
)


def _rule(key: str) -> bool | None:
    """None if ``key`` is no known ADM key, else whether it is a 1x1-conv weight."""
    for pattern, conv1x1 in KEY_MAP:
        if pattern.fullmatch(key):
            return conv1x1
    return None


def convert_adm_state_dict(
    state_dict: Mapping[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Official ADM layout -> ours. Returns (converted tensors, official keys that match no rule)."""
    out: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for key, value in state_dict.items():
        conv1x1 = _rule(key)
        if conv1x1 is None:
            unknown.append(key)
            continue
        out[key] = value.squeeze(-1) if conv1x1 and value.ndim == 3 and value.shape[-1] == 1 else value
    return out, unknown


def to_adm_state_dict(state: nn.Module | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Ours -> the official ADM layout (inverse of :func:`convert_adm_state_dict`), e.g. to export weights."""
    state_dict = state.state_dict() if isinstance(state, nn.Module) else state
    out = {}
    for key, value in state_dict.items():
        conv1x1 = _rule(key)
        if conv1x1 is None:
            raise ValueError(f"{key} has no counterpart in the ADM layout")
        out[key] = value.unsqueeze(-1) if conv1x1 and value.ndim == 2 else value
    return out


def load_adm_state_dict(
    module: nn.Module, state_dict: Mapping[str, torch.Tensor], assign: bool = False
) -> nn.Module:
    """Load an official ADM state dict (diffusion UNet or classifier) into ``module`` and return ``module``.

    ``module`` must be built with the checkpoint's flags (see :data:`ADM_PRESETS` / :func:`adm_model_config`).
    ``assign=True`` is passed on to ``load_state_dict`` (e.g. for a module built on the meta device).
    Raises ValueError, in one line, on the first tensor whose shape differs and on missing/unexpected keys.
    """
    converted, unknown = convert_adm_state_dict(state_dict)
    problem = state_dict_mismatch(module.state_dict(), {**{k: state_dict[k] for k in unknown}, **converted})
    if problem:
        raise ValueError(f"ADM checkpoint does not fit this model (do its flags match?): {problem}")
    module.load_state_dict(converted, strict=True, assign=assign)
    return module
