"""Batch-norm statistics from the convolutions' per-tile partial sums, in one launch.

``bn_finalize`` turns the [tiles, 2, C] (sum, sum of squares) partials of an epilogue into the batch
mean, 1/std, unbiased variance (for the running statistics) and the prologue's scale / shift
(``gamma * invstd``, ``beta - mean * scale``), reducing and computing in float64. Done with torch ops,
this was about a dozen small launches per layer: on a GPU the block is bound by launching work
(benchmarks/results/NOTES.md), not by this arithmetic.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .common import interpreting

_CONSTANTS: dict = {}


def _constants(eps: float, count: int, device: torch.device) -> Tensor:
    """[eps, count] as float64 on the device, cached: Triton would pass a Python float as float32, and a
    host-to-device copy per call would be one more launch."""
    key = (float(eps), int(count), device)
    vec = _CONSTANTS.get(key)
    if vec is None:
        vec = _CONSTANTS[key] = torch.tensor([eps, count], dtype=torch.float64, device=device)
    return vec


@triton.jit
def _bn_finalize_kernel(part_ptr, tiles, C, const_ptr, gamma_ptr, beta_ptr,
                        mean_ptr, invstd_ptr, var_ptr, scale_ptr, shift_ptr,
                        F64: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = offs_c < C
    s = tl.zeros((BLOCK_C,), dtype=tl.float64)
    ss = tl.zeros((BLOCK_C,), dtype=tl.float64)
    for t0 in range(0, tiles, BLOCK_T):  # in tile order: deterministic
        offs_t = t0 + tl.arange(0, BLOCK_T)
        mask = (offs_t < tiles)[:, None] & c_mask[None, :]
        ptrs = part_ptr + offs_t[:, None].to(tl.int64) * 2 * C + offs_c[None, :]
        s += tl.sum(tl.load(ptrs, mask=mask, other=0.0).to(tl.float64), axis=0)
        ss += tl.sum(tl.load(ptrs + C, mask=mask, other=0.0).to(tl.float64), axis=0)
    eps = tl.load(const_ptr)
    count = tl.load(const_ptr + 1)
    mean = s / count
    var = tl.maximum(ss / count - mean * mean, 0.0)
    # the square root in the output dtype: correctly rounded float32 (sqrt_rn; plain sqrt is approximate on
    # CUDA), or float64 only for float64 data, which the backend takes in the interpreter alone
    if F64:
        invstd = 1.0 / tl.sqrt(var + eps)
    else:
        invstd = (1.0 / tl.sqrt_rn((var + eps).to(tl.float32))).to(tl.float64)
    unbiased = var * (count / tl.maximum(count - 1.0, 1.0))
    sc = tl.load(gamma_ptr + offs_c, mask=c_mask, other=0.0).to(tl.float64) * invstd
    sh = tl.load(beta_ptr + offs_c, mask=c_mask, other=0.0).to(tl.float64) - mean * sc
    tl.store(mean_ptr + offs_c, mean.to(mean_ptr.dtype.element_ty), mask=c_mask)
    tl.store(invstd_ptr + offs_c, invstd.to(invstd_ptr.dtype.element_ty), mask=c_mask)
    tl.store(var_ptr + offs_c, unbiased.to(var_ptr.dtype.element_ty), mask=c_mask)
    tl.store(scale_ptr + offs_c, sc.to(scale_ptr.dtype.element_ty), mask=c_mask)
    tl.store(shift_ptr + offs_c, sh.to(shift_ptr.dtype.element_ty), mask=c_mask)


def bn_finalize(part: Tensor, count: int, eps: float, gamma: Tensor, beta: Tensor) -> tuple[Tensor, ...]:
    """(mean, invstd, unbiased var, scale, shift), each [C] in the partials' dtype, from ``part``
    [tiles, 2, C] (per-tile sum and sum of squares over ``count`` values in all)."""
    tiles, two, c = part.shape
    if two != 2 or gamma.shape != (c,) or beta.shape != (c,):
        raise ValueError(f"partials {tuple(part.shape)} and affine {tuple(gamma.shape)} do not fit")
    outs = [torch.empty(c, device=part.device, dtype=part.dtype) for _ in range(5)]
    block_c = 16 if interpreting() else min(256, triton.next_power_of_2(max(c, 1)))
    if c > 0:
        _bn_finalize_kernel[(triton.cdiv(c, block_c),)](
            part.contiguous(), tiles, c, _constants(eps, count, part.device), gamma.contiguous(), beta.contiguous(),
            *outs, F64=part.dtype == torch.float64, BLOCK_T=16 if interpreting() else 32, BLOCK_C=block_c,
        )
    return tuple(outs)
