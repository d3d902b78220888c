"""Symmetric int8 quantisation of memory tensors, one scale per vector (`memory_dtype="int8"`).

A vector x (the last dim) is stored as round(x / s) in int8 with s = max|x| / 127 in float16, so
its largest entry is exact up to float16 rounding of s and every entry is within s/2 of x.
"""

from __future__ import annotations

import torch

SCALE_DTYPE = torch.float16
COMPUTE_DTYPE = torch.bfloat16  # what an int8 memory dequantises to (scores, gathered keys/values)


def quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., D) -> int8 (..., D) and scales (...,) in float16; an all-zero vector gets scale 0."""
    absmax = x.float().abs().amax(dim=-1)                    # (...,)
    scale = (absmax / 127).to(SCALE_DTYPE)
    safe = scale.float().clamp_min(torch.finfo(torch.float32).tiny)
    q = (x.float() / safe[..., None]).round().clamp(-127, 127).to(torch.int8)
    return q, scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = COMPUTE_DTYPE) -> torch.Tensor:
    """int8 (..., D) and scales (...,) -> (..., D) in `dtype`."""
    return (q * scale.float()[..., None]).to(dtype)  # int8 * float32 computes in float32 without a float copy of q
