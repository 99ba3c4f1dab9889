"""``trainer.precision=auto``: bf16 autocast where the hardware runs it fast, full fp32 elsewhere.

bf16 autocast pays off on CUDA GPUs with bf16 support and on CPUs with AMX tiles (Sapphire Rapids and later,
measured 1.7-1.8x on the train step here); on other CPUs bf16 matmuls are emulated and slower than fp32.
"""

from __future__ import annotations

import torch

AUTO = "auto"


def cpu_has_fast_bf16() -> bool:
    is_amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(is_amx and is_amx())


def resolve_precision(precision: str | int, accelerator: str | None = "auto") -> str | int:
    """``precision`` unchanged unless it is ``auto``: then ``bf16-mixed`` or ``32-true`` for the device that
    ``accelerator`` (Lightning's names: auto, cpu, gpu, cuda) will use."""
    if str(precision) != AUTO:
        return precision
    accelerator = str(accelerator or "auto").lower()
    if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "32-true"
    return "bf16-mixed" if cpu_has_fast_bf16() else "32-true"


def check_accelerator(accelerator: str | None) -> None:
    """Fail in one line, before any work, when a GPU is asked for and torch sees none."""
    name = str(accelerator or "auto").lower()
    mps = getattr(torch.backends, "mps", None)
    found = torch.cuda.is_available() or (name == "gpu" and mps is not None and mps.is_available())
    if name in ("gpu", "cuda") and not found:
        raise ValueError(f"trainer.accelerator={name} but torch sees no GPU (torch {torch.__version__}, "
                         f"CUDA build {torch.version.cuda or 'none'}): drop trainer=gpu to train on the CPU, "
                         "or install a CUDA build of torch that matches the driver")
