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

This module also holds the flags of the published checkpoints (:data:`ADM_PRESETS`) and the translation of
ADM's command-line flags into our constructor arguments (:func:`adm_model_config`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

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


# ADM's command-line flags (guided_diffusion.script_util defaults), so that MODEL_FLAGS copy-paste works.
ADM_MODEL_DEFAULTS: dict[str, Any] = {
    "image_size": 64,
    "num_channels": 128,
    "num_res_blocks": 2,
    "num_heads": 4,
    "num_heads_upsample": -1,
    "num_head_channels": -1,
    "attention_resolutions": "16,8",
    "channel_mult": "",
    "dropout": 0.0,
    "class_cond": False,
    "use_checkpoint": False,
    "use_scale_shift_norm": True,
    "resblock_updown": False,
    "use_fp16": False,
    "use_new_attention_order": False,
    "learn_sigma": False,
}
ADM_CLASSIFIER_DEFAULTS: dict[str, Any] = {
    "image_size": 64,
    "classifier_use_fp16": False,
    "classifier_width": 128,
    "classifier_depth": 2,
    "classifier_attention_resolutions": "32,16,8",
    "classifier_use_scale_shift_norm": True,
    "classifier_resblock_updown": True,
    "classifier_pool": "attention",
}
ADM_DIFFUSION_DEFAULTS: dict[str, Any] = {
    "diffusion_steps": 1000,
    "noise_schedule": "linear",
    "timestep_respacing": "",
    "use_kl": False,
    "predict_xstart": False,
    "rescale_timesteps": False,
    "rescale_learned_sigmas": False,
}
# ADM's channel_mult when --channel_mult is empty (its create_model / create_classifier).
ADM_CHANNEL_MULT = {
    512: (0.5, 1, 1, 2, 2, 4, 4),
    256: (1, 1, 2, 2, 4, 4),
    128: (1, 1, 2, 3, 4),
    64: (1, 2, 3, 4),
}
ADM_NUM_CLASSES = 1000

_ADM_256 = {
    "attention_resolutions": "32,16,8",
    "diffusion_steps": 1000,
    "image_size": 256,
    "learn_sigma": True,
    "noise_schedule": "linear",
    "num_channels": 256,
    "num_head_channels": 64,
    "num_res_blocks": 2,
    "resblock_updown": True,
    "use_fp16": True,
    "use_scale_shift_norm": True,
}
_ADM_CLASSIFIER = {
    "classifier_attention_resolutions": "32,16,8",
    "classifier_depth": 2,
    "classifier_width": 128,
    "classifier_pool": "attention",
    "classifier_resblock_updown": True,
    "classifier_use_scale_shift_norm": True,
}
# The released checkpoints (guided-diffusion README): preset -> (kind, ADM flags).
ADM_PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "imagenet64": (
        "unet",
        {  # 64x64_diffusion.pt
            "attention_resolutions": "32,16,8",
            "class_cond": True,
            "diffusion_steps": 1000,
            "dropout": 0.1,
            "image_size": 64,
            "learn_sigma": True,
            "noise_schedule": "cosine",
            "num_channels": 192,
            "num_head_channels": 64,
            "num_res_blocks": 3,
            "resblock_updown": True,
            "use_new_attention_order": True,
            "use_fp16": True,
            "use_scale_shift_norm": True,
        },
    ),
    "imagenet128": (
        "unet",
        {  # 128x128_diffusion.pt
            "attention_resolutions": "32,16,8",
            "class_cond": True,
            "diffusion_steps": 1000,
            "image_size": 128,
            "learn_sigma": True,
            "noise_schedule": "linear",
            "num_channels": 256,
            "num_heads": 4,
            "num_res_blocks": 2,
            "resblock_updown": True,
            "use_fp16": True,
            "use_scale_shift_norm": True,
        },
    ),
    "imagenet256": ("unet", {**_ADM_256, "class_cond": True}),  # 256x256_diffusion.pt
    "imagenet256_uncond": ("unet", {**_ADM_256, "class_cond": False}),  # 256x256_diffusion_uncond.pt
    "lsun256": ("unet", {**_ADM_256, "class_cond": False, "dropout": 0.1}),  # lsun_{bedroom,cat,horse}.pt
    "classifier64": ("classifier", {**_ADM_CLASSIFIER, "image_size": 64, "classifier_depth": 4}),
    "classifier128": ("classifier", {**_ADM_CLASSIFIER, "image_size": 128}),
    "classifier256": ("classifier", {**_ADM_CLASSIFIER, "image_size": 256}),
}
KINDS = ("unet", "classifier")


def _ints(value: Any) -> list[int]:
    if isinstance(value, str):
        return [int(v) for v in value.split(",") if v.strip()]
    return [int(v) for v in value]


def _mult(value: Any, image_size: int) -> list[float]:
    if value in ("", None):
        if image_size not in ADM_CHANNEL_MULT:
            raise ValueError(
                f"no ADM default channel_mult for image_size={image_size}; pass channel_mult "
                f"(ADM's defaults exist for {sorted(ADM_CHANNEL_MULT)})"
            )
        value = ADM_CHANNEL_MULT[image_size]
    items = value.split(",") if isinstance(value, str) else value
    return [int(float(m)) if float(m).is_integer() else float(m) for m in items]


def adm_model_config(kind: str, flags: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """ADM command-line flags -> kwargs of :class:`UNet` (``kind="unet"``) or :class:`EncoderUNet`.

    Unset flags take ADM's script defaults; as in ADM, an empty ``channel_mult`` means the published one for
    the image size, ``learn_sigma`` doubles the output channels, ``class_cond`` means 1000 classes and a
    classifier has 1000 outputs and 64 channels per head. ``use_fp16`` is accepted and ignored (use autocast).
    The result holds plain Python values only.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; allowed: {', '.join(KINDS)}")
    defaults = ADM_MODEL_DEFAULTS if kind == "unet" else ADM_CLASSIFIER_DEFAULTS
    known = set(defaults) | set(ADM_DIFFUSION_DEFAULTS)
    unknown = sorted(set(flags or {}) - known)
    if unknown:
        raise ValueError(f"unknown ADM {kind} flags {unknown}; allowed: {', '.join(sorted(known))}")
    f = {**defaults, **(flags or {})}
    size = int(f["image_size"])
    if kind == "unet":
        return {
            "image_size": size,
            "in_channels": 3,
            "model_channels": int(f["num_channels"]),
            "out_channels": 6 if f["learn_sigma"] else 3,
            "num_res_blocks": int(f["num_res_blocks"]),
            "attention_resolutions": _ints(f["attention_resolutions"]),
            "dropout": float(f["dropout"]),
            "channel_mult": _mult(f["channel_mult"], size),
            "num_classes": ADM_NUM_CLASSES if f["class_cond"] else None,
            "num_heads": int(f["num_heads"]),
            "num_head_channels": int(f["num_head_channels"]),
            "num_heads_upsample": int(f["num_heads_upsample"]),
            "use_scale_shift_norm": bool(f["use_scale_shift_norm"]),
            "resblock_updown": bool(f["resblock_updown"]),
            "use_new_attention_order": bool(f["use_new_attention_order"]),
            "use_checkpoint": bool(f["use_checkpoint"]),
        }
    return {
        "image_size": size,
        "in_channels": 3,
        "model_channels": int(f["classifier_width"]),
        "out_channels": ADM_NUM_CLASSES,
        "num_res_blocks": int(f["classifier_depth"]),
        "attention_resolutions": _ints(f["classifier_attention_resolutions"]),
        "channel_mult": _mult("", size),
        "num_head_channels": 64,
        "use_scale_shift_norm": bool(f["classifier_use_scale_shift_norm"]),
        "resblock_updown": bool(f["classifier_resblock_updown"]),
        "pool": str(f["classifier_pool"]),
    }
