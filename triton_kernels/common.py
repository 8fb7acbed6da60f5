"""What the Triton kernels share: the interpreter switch, dtype choices, and the fused input prologue."""
from __future__ import annotations

import os
from typing import NamedTuple, Optional

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
    return {torch.float32: tl.float32, torch.float64: tl.float64, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}[dtype]


def dot_dtype(dtype: torch.dtype):
    """The operand dtype of tl.dot. The interpreter's bf16 dot is wrong (design.md section 3): use fp32 there."""
    if dtype == torch.bfloat16 and interpreting():
        return tl.float32
    return tl_dtype(dtype)


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 data multiply in true fp32 ('ieee'), not tf32, so the tight fp32 tolerance holds."""
    return "ieee" if dtype in (torch.float32, torch.float64) else "tf32"


def conv_output_size(h: int, w: int, kernel_size: int, stride: int, padding: int) -> tuple[int, int]:
    return (h + 2 * padding - kernel_size) // stride + 1, (w + 2 * padding - kernel_size) // stride + 1


class Prologue(NamedTuple):
    """``act(scale[c] * x + shift[c])`` applied to the input as it is loaded; the activation (scaled
    leaky: ``act_scale * (v > 0 ? v : slope * v)``) only on channels ``[act_lo, act_hi)``. Padding
    stays zero after it (the padded tensor is the normalised one)."""

    scale: Tensor
    shift: Tensor
    act_lo: int
    act_hi: int
    slope: float
    act_scale: float


_ACT_VECTORS: dict = {}


def act_vector(slope: float, act_scale: float, like: Tensor, acc: torch.dtype) -> Tensor:
    """[positive slope, negative slope] of the scaled leaky activation, as a tensor: Triton would pass
    Python floats as float32, too coarse for float64 data. Cached: a host-to-device copy per call
    would cost more than the small kernels it feeds."""
    key = (float(slope), float(act_scale), like.device, acc)
    vec = _ACT_VECTORS.get(key)
    if vec is None:
        vec = _ACT_VECTORS[key] = torch.tensor([act_scale, act_scale * slope], dtype=acc, device=like.device)
    return vec


def prologue_args(prologue: Optional[Prologue], like: Tensor, acc: torch.dtype) -> tuple:
    """(scale, shift, act_lo, act_hi, act_vector) kernel arguments; dummies without a prologue."""
    if prologue is None:
        dummy = like.new_zeros(2, dtype=acc)
        return dummy, dummy, 0, 0, dummy
    p = prologue
    acts = act_vector(p.slope, p.act_scale, like, acc)
    return p.scale.to(acc).contiguous(), p.shift.to(acc).contiguous(), p.act_lo, p.act_hi, acts


@triton.jit
def apply_prologue(a, offs_k, mask2d, scale_ptr, shift_ptr, k_mask, act_lo, act_hi, pos, neg, ACC: tl.constexpr):
    """BN-apply + activation of a loaded [rows, channels] tile (channels along axis 1)."""
    sc = tl.load(scale_ptr + offs_k, mask=k_mask, other=0.0)
    sh = tl.load(shift_ptr + offs_k, mask=k_mask, other=0.0)
    v = a.to(ACC) * sc[None, :] + sh[None, :]
    in_act = (offs_k >= act_lo) & (offs_k < act_hi)
    activated = tl.where(v > 0, v * pos, v * neg)
    v = tl.where(in_act[None, :], activated, v)
    return tl.where(mask2d, v, 0.0)


@triton.jit
def act_derivative(y, in_act, pos, neg):
    """d act / d y of the scaled leaky family where ``in_act``, else 1 (identity)."""
    d = tl.where(y > 0, pos, neg)
    return tl.where(in_act, d, 1.0)
