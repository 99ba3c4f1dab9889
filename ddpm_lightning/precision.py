"""``trainer.precision=auto``: bf16 autocast where the hardware runs it fast, full fp32 elsewhere.

bf16 autocast pays off on CUDA GPUs with bf16 support and on CPUs with native bf16 dot products: AMX tiles
(Sapphire Rapids and later; train step 1.4-2.0x measured) or AVX512-BF16 (Cooper Lake, AMD Zen 4 and later;
1.4x measured on Zen 4). Without either, oneDNN emulates bf16 and it is slower than fp32. The same holds where the
process is held below those instructions (``ONEDNN_MAX_CPU_ISA=AVX2``, ``ATEN_CPU_CAPABILITY=avx2``: how an AVX2
machine is emulated), whatever the CPU has.
"""

from __future__ import annotations

import os

import torch

AUTO = "auto"
# oneDNN ISA caps (ONEDNN_MAX_CPU_ISA, or DNNL_ as before oneDNN 2) at or above native bf16 dot products
BF16_ISAS = frozenset({"AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX512_CORE_AMX", "AVX512_CORE_AMX_FP16",
                       "AVX10_1_512", "AVX10_1_512_AMX", "AVX10_1_512_AMX_FP16", "AVX10_2_512", "AVX10_2_512_AMX_2",
                       "ALL", "DEFAULT"})


def _cpu_supports(probe: str) -> bool:
    check = getattr(torch.cpu, probe, None)  # private probes of torch.cpu; absent -> assume no support
    return bool(check and check())


def isa_capped_below_bf16() -> bool:
    """Whether this process's kernels are held below native bf16 (``ONEDNN_MAX_CPU_ISA`` / ``DNNL_MAX_CPU_ISA`` under
    AVX512_CORE_BF16, or ``ATEN_CPU_CAPABILITY`` other than avx512), whatever the CPU has."""
    isa = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "").strip().upper()
    aten = os.environ.get("ATEN_CPU_CAPABILITY", "").strip().lower()
    return bool(isa and isa not in BF16_ISAS) or bool(aten and aten != "avx512")


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU has native bf16 dot products (AMX tiles or AVX512-BF16) that oneDNN uses here: the CPU has
    them and the process is not held below them (``isa_capped_below_bf16``)."""
    has = _cpu_supports("_is_amx_tile_supported") or _cpu_supports("_is_avx512_bf16_supported")
    return has and not isa_capped_below_bf16()


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
