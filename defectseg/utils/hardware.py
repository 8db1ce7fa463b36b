"""What the machine's processor supports: bf16 on the CPU, bf16 or fp16 on the GPU.

The shipped configs train with ``trainer.precision: bf16-mixed``: on a CPU with native bf16
instructions (AVX512-BF16, AMX, or Arm's BF16 extension) bf16 autocast with channels_last makes
a training step 2.4x (128x128) to 3.1x (256x256) faster than fp32 (``benchmarks/train_speed.py``).
Where the processor lacks them, autocast would emulate bf16 and run slower than fp32, so
:func:`resolve_precision` falls back (``32-true`` on such a CPU, ``16-mixed`` on a GPU without
bf16) with one warning. The ``defectseg`` CLI applies it before building the trainer.
"""

from __future__ import annotations

import functools
import platform
import warnings

import torch

#: /proc/cpuinfo flags that mean native bf16 arithmetic
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")


@functools.lru_cache(maxsize=1)
def cpu_supports_bf16() -> bool:
    """Whether the CPU has native bf16 instructions (oneDNN's check, else /proc/cpuinfo)."""
    check = getattr(getattr(torch.ops, "mkldnn", None), "_is_mkldnn_bf16_supported", None)
    if check is not None:
        try:
            if bool(check()):
                return True
        except (RuntimeError, AttributeError):
            pass
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            flags = {word for line in handle if line.startswith(("flags", "Features")) for word in line.split()}
    except OSError:
        return platform.machine() == "arm64" and platform.system() == "Darwin"  # Apple M2 and later have BF16
    return any(flag in flags for flag in BF16_CPU_FLAGS)


def _name(accelerator: object) -> str:
    return accelerator.lower() if isinstance(accelerator, str) else type(accelerator).__name__.lower()


def uses_cuda(accelerator: object) -> bool:
    """Whether a trainer with ``accelerator`` runs on CUDA (``auto`` when a GPU is visible)."""
    name = _name(accelerator)
    return (name in ("cuda", "gpu", "auto") or "cuda" in name) and torch.cuda.is_available()


def uses_cpu(accelerator: object) -> bool:
    """Whether a trainer with ``accelerator`` runs on the CPU (``auto`` without GPU or MPS)."""
    name = _name(accelerator)
    if name == "auto":
        mps = getattr(torch.backends, "mps", None)
        return not torch.cuda.is_available() and not (mps is not None and mps.is_available())
    return name == "cpu" or "cpuaccelerator" in name


def resolve_precision(precision: object, accelerator: object = "auto") -> object:
    """``precision``, or what replaces a bf16 setting the hardware lacks (with one warning).

    ``bf16-mixed``/``bf16-true`` on a CPU without native bf16 become ``32-true``; on a CUDA GPU
    without bf16 (before Ampere) ``16-mixed``. Everything else is returned unchanged.
    """
    text = str(precision)
    if not text.startswith("bf16"):
        return precision
    if uses_cpu(accelerator) and not cpu_supports_bf16():
        warnings.warn(
            f"trainer.precision={text} but this CPU has no native bf16 instructions (AVX512-BF16, "
            "AMX or Arm BF16), where bf16 runs slower than fp32; training in 32-true instead. "
            "Set trainer.precision: 32-true to silence this.",
            stacklevel=2,
        )
        return "32-true"
    if uses_cuda(accelerator) and not torch.cuda.is_bf16_supported():
        warnings.warn(
            f"trainer.precision={text} but this GPU has no bf16 support; training in 16-mixed instead",
            stacklevel=2,
        )
        return "16-mixed"
    return precision
