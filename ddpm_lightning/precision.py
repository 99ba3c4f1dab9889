"""``trainer.precision=auto``: bf16 autocast where the hardware runs it fast, full fp32 elsewhere.

bf16 autocast pays off on CUDA GPUs with bf16 support and on CPUs with native bf16 dot products: AMX tiles
(Sapphire Rapids and later; train step 1.4-2.0x measured) or AVX512-BF16 (Cooper Lake, AMD Zen 4 and later;
1.4x measured on Zen 4). Without either, oneDNN emulates bf16 and it is slower than fp32.
"""

from __future__ import annotations

import torch

AUTO = "auto"


def _cpu_supports(probe: str) -> bool:
    check = getattr(torch.cpu, probe, None)  # private probes of torch.cpu; absent -> assume no support
    return bool(check and check())


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU has native bf16 dot products (AMX tiles or AVX512-BF16) that oneDNN uses."""
    return _cpu_supports("_is_amx_tile_supported") or _cpu_supports("_is_avx512_bf16_supported")


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
