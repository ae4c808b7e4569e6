"""Which floating-point type a training step's matrix products use: one rule for both trainers.

``auto`` picks bfloat16 where the hardware multiplies it natively -- CUDA GPUs with bf16 support, and
CPUs with AVX512-BF16 or AMX tiles -- and float32 elsewhere, where bf16 would be emulated and slower.
The check reads CPU-feature flags, not a timing, so every worker of a run decides the same.
"""

from __future__ import annotations

from typing import Any, Literal

import torch

Precision = Literal["auto", "fp32", "bf16"]


def native_bf16(device: Any) -> bool:
    """Whether ``device`` multiplies bf16 matrices in hardware."""
    if torch.device(device).type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    cpu = torch.cpu
    return bool(getattr(cpu, "_is_avx512_bf16_supported", lambda: False)() or getattr(cpu, "_is_amx_tile_supported", lambda: False)())


def compute_dtype(precision: Precision | str, device: Any) -> torch.dtype:
    """``precision`` 'fp32' / 'bf16' as given; 'auto' = bf16 where :func:`native_bf16`, else fp32."""
    if precision not in ("auto", "fp32", "bf16"):
        raise ValueError(f"precision {precision!r}: use auto, fp32 or bf16")
    if precision == "fp32":
        return torch.float32
    if precision == "bf16":
        return torch.bfloat16
    return torch.bfloat16 if native_bf16(device) else torch.float32
