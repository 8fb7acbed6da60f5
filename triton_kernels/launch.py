"""What every kernel launch needs: the interpreter switch, dtype choices, cached device constants and
dummy pointers, per-channel parameters given whole or as two halves, and the tile helpers that read
them (the batch-norm prologues are in :mod:`.bn_tiles`, the layer-norm ones in :mod:`.ln_tiles`)."""

from __future__ import annotations

import os
from typing import Union

import torch
import triton
import triton.language as tl
from torch import Tensor


def interpreting() -> bool:
    """True under ``TRITON_INTERPRET=1``: kernels run on the CPU through numpy (slow; tests only)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulate in float64 for float64 data, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def tl_dtype(dtype: torch.dtype):
    return {
        torch.float32: tl.float32,
        torch.float64: tl.float64,
        torch.float16: tl.float16,
        torch.bfloat16: tl.bfloat16,
    }[dtype]


def dot_dtype(dtype: torch.dtype):
    """The operand dtype of tl.dot. The interpreter's bf16 dot is wrong: use fp32 there."""
    if dtype == torch.bfloat16 and interpreting():
        return tl.float32
    return tl_dtype(dtype)


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 data multiply in true fp32 ('ieee'), not tf32, so the tight fp32 tolerance holds."""
    return "ieee" if dtype in (torch.float32, torch.float64) else "tf32"


def conv_output_size(h: int, w: int, kernel_size: int, stride: int, padding: int) -> tuple[int, int]:
    return (h + 2 * padding - kernel_size) // stride + 1, (w + 2 * padding - kernel_size) // stride + 1


Pair = Union[Tensor, tuple[Tensor, Tensor]]


def split_halves(t: Pair, channels: int) -> tuple[Tensor, Tensor, int]:
    """(low, high, split) of a per-channel parameter given whole or as its two halves."""
    if isinstance(t, Tensor):
        return t.contiguous(), t.contiguous(), channels
    lo, hi = t
    if lo.shape[0] + hi.shape[0] != channels:
        raise ValueError(f"affine halves of {lo.shape[0]} + {hi.shape[0]} channels do not make {channels}")
    return lo.contiguous(), hi.contiguous(), lo.shape[0]


_CONSTANTS: dict = {}


def device_constants(values: tuple, device: torch.device, dtype: torch.dtype) -> Tensor:
    """Scalars as a small cached tensor on the device: Triton would pass Python floats as float32, too
    coarse for float64 data, and a host-to-device copy per call would cost more than the small kernels
    they feed."""
    key = (tuple(float(v) for v in values), device, dtype)
    vec = _CONSTANTS.get(key)
    if vec is None:
        vec = _CONSTANTS[key] = torch.tensor(key[0], dtype=dtype, device=device)
    return vec


def act_vector(slope: float, act_scale: float, like: Tensor, acc: torch.dtype) -> Tensor:
    """[positive slope, negative slope] of the scaled leaky activation (see :func:`device_constants`)."""
    return device_constants((act_scale, act_scale * slope), like.device, acc)


_DUMMIES: dict = {}


def dummy(like: Tensor, acc: torch.dtype) -> Tensor:
    """A small cached tensor for pointer arguments a kernel variant never reads."""
    key = (like.device, acc)
    if key not in _DUMMIES:
        _DUMMIES[key] = torch.zeros(2, dtype=acc, device=like.device)
    return _DUMMIES[key]


def as_acc(t: Tensor, acc: torch.dtype) -> Tensor:
    # checked first: a no-op .to() / .contiguous() still costs a dispatch per call
    return t if t.dtype == acc and t.is_contiguous() else t.to(acc).contiguous()


@triton.jit
def load_split(lo_ptr, hi_ptr, offs_c, split, c_mask):
    """A per-channel vector stored as two tensors: channels below ``split`` from ``lo_ptr``, the rest
    from ``hi_ptr`` (the coder's and the learner's norm parameters, without concatenating them)."""
    lo = tl.load(lo_ptr + offs_c, mask=c_mask & (offs_c < split), other=0.0)
    hi = tl.load(hi_ptr + (offs_c - split), mask=c_mask & (offs_c >= split), other=0.0)
    return tl.where(offs_c < split, lo, hi)


@triton.jit
def inverse_sqrt(v, F64: tl.constexpr):
    """1 / sqrt(v) of a float64 value, the square root taken in the output dtype: correctly rounded
    float32 (sqrt_rn, as torch's; plain sqrt is approximate on CUDA), or float64 for float64 data
    (which the backends take in the interpreter alone). Returned as float64. A v past float32's range
    (the variance of activations beyond ~1e19) is taken in float64: its inverse root still fits."""
    if F64:
        return 1.0 / tl.sqrt(v)
    narrow = (1.0 / tl.sqrt_rn(tl.minimum(v, 3.0e38).to(tl.float32))).to(tl.float64)
    return tl.where(v < 3.0e38, narrow, 1.0 / tl.sqrt(v))
