"""ADM networks as plain ``nn.Module``s: diffusion UNet, noisy classifier, official-weight loading."""

from .adm_checkpoint import (
    ADM_PRESETS,
    adm_model_config,
    convert_adm_state_dict,
    load_adm_state_dict,
    to_adm_state_dict,
)
from .encoder_unet import POOLS, EncoderUNet
from .layers import AttentionBlock, AttentionPool2d, ResBlock, timestep_embedding
from .unet import UNet

__all__ = [
    "ADM_PRESETS",
    "POOLS",
    "AttentionBlock",
    "AttentionPool2d",
    "EncoderUNet",
    "ResBlock",
    "UNet",
    "adm_model_config",
    "convert_adm_state_dict",
    "load_adm_state_dict",
    "timestep_embedding",
    "to_adm_state_dict",
]
