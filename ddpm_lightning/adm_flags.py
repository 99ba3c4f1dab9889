"""ADM's command-line flags (guided_diffusion.script_util defaults), the flags of the published checkpoints
(:data:`ADM_PRESETS`) and their translation into our constructor arguments (:func:`adm_model_config`).

Plain Python (no torch): ``ddpm-convert-adm --help`` and a flag error answer before torch is imported.
``models/adm_checkpoint.py`` (the key map) re-exports these names.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

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
