"""What the Triton kernels share: the interpreter switch, dtype choices, and the fused load prologues
(batch norm + activation on a forward input, their backward on an output gradient)."""

from __future__ import annotations

import os
from typing import NamedTuple, Optional, Union

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


class GradPrologue(NamedTuple):
    """The backward of ``act(BN(u))`` applied to an output gradient as it is loaded, so the gradient
    of the pre-norm ``u`` never exists in memory:

        du = a[c] * g + b[c] * (u - mean[c]) + k[c],   g = dy * act'(scale[c] * u + shift[c])

    with act' on channels ``[act_lo, act_hi)`` only. ``saved`` is ``u`` in the gradient's layout (same
    shape and strides); ``scale`` / ``shift`` are the forward's; ``coef`` is [4, C] (a, mean, b, k) from
    :func:`~.bn_stats.bn_backward_finalize` (in training ``a = gamma * invstd``, ``b = -a * invstd *
    mean(g * xhat)``, ``k = -a * mean(g)``, the batch statistics' own gradient; in eval b = k = 0)."""

    saved: Tensor
    scale: Tensor
    shift: Tensor
    coef: Tensor
    act_lo: int
    act_hi: int
    slope: float
    act_scale: float


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


def prologue_args(prologue: Optional[Prologue], like: Tensor, acc: torch.dtype) -> tuple:
    """(scale, shift, act_lo, act_hi, act_vector) kernel arguments; dummies without a prologue."""
    if prologue is None:
        unused = dummy(like, acc)
        return unused, unused, 0, 0, unused
    p = prologue
    acts = act_vector(p.slope, p.act_scale, like, acc)
    return as_acc(p.scale, acc), as_acc(p.shift, acc), p.act_lo, p.act_hi, acts


def grad_prologue_args(prologue: Optional[GradPrologue], like: Tensor, acc: torch.dtype) -> tuple:
    """(saved, scale, shift, coef, act_lo, act_hi, act_vector) kernel arguments; dummies without one.
    ``like``: the gradient the prologue rides on (``saved`` must match its shape and strides)."""
    if prologue is None:
        unused = dummy(like, acc)
        return like, unused, unused, unused, 0, 0, unused
    p = prologue
    if p.saved.shape != like.shape or p.saved.stride() != like.stride():
        raise ValueError(
            f"the saved tensor {tuple(p.saved.shape)} / {p.saved.stride()} must share the gradient's "
            f"shape and strides {tuple(like.shape)} / {like.stride()}"
        )
    channels = p.scale.shape[0]
    if p.coef.shape != (4, channels) or p.shift.shape != (channels,):
        raise ValueError(f"coef {tuple(p.coef.shape)} / shift {tuple(p.shift.shape)} do not fit {channels} channels")
    acts = act_vector(p.slope, p.act_scale, like, acc)
    return p.saved, as_acc(p.scale, acc), as_acc(p.shift, acc), as_acc(p.coef, acc), p.act_lo, p.act_hi, acts


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
    (which the backends take in the interpreter alone). Returned as float64."""
    if F64:
        return 1.0 / tl.sqrt(v)
    return (1.0 / tl.sqrt_rn(v.to(tl.float32))).to(tl.float64)


@triton.jit
def act_derivative(y, in_act, pos, neg):
    """d act / d y of the scaled leaky family where ``in_act``, else 1 (identity)."""
    d = tl.where(y > 0, pos, neg)
    return tl.where(in_act, d, 1.0)


@triton.jit
def apply_grad_prologue(
    g, u, offs_c, mask2d, scale_ptr, shift_ptr, coef_ptr, C, c_mask, act_lo, act_hi, pos, neg, ACC: tl.constexpr
):
    """:class:`GradPrologue` on a loaded gradient tile ``g`` and the saved pre-norm tile ``u`` ([rows,
    channels], channels along axis 1)."""
    sc = tl.load(scale_ptr + offs_c, mask=c_mask, other=0.0)
    sh = tl.load(shift_ptr + offs_c, mask=c_mask, other=0.0)
    a = tl.load(coef_ptr + offs_c, mask=c_mask, other=0.0)
    mu = tl.load(coef_ptr + C + offs_c, mask=c_mask, other=0.0)
    b = tl.load(coef_ptr + 2 * C + offs_c, mask=c_mask, other=0.0)
    k = tl.load(coef_ptr + 3 * C + offs_c, mask=c_mask, other=0.0)
    u = u.to(ACC)
    in_act = ((offs_c >= act_lo) & (offs_c < act_hi))[None, :]
    d = act_derivative(u * sc[None, :] + sh[None, :], in_act, pos, neg)
    du = a[None, :] * (g.to(ACC) * d) + b[None, :] * (u - mu[None, :]) + k[None, :]
    return tl.where(mask2d, du, 0.0)


# what the kernels do to an operand as they load it (a constexpr)
NO_PROLOGUE, BN_ACT, BN_ACT_BACKWARD = 0, 1, 2


def prologue_kind(prologue) -> int:
    if prologue is None:
        return NO_PROLOGUE
    return BN_ACT_BACKWARD if isinstance(prologue, GradPrologue) else BN_ACT


def operand_args(prologue, x: Tensor, acc: torch.dtype) -> tuple:
    """(saved, scale, shift, coef, act_lo, act_hi, act_vector) for either kind of prologue."""
    if isinstance(prologue, GradPrologue):
        return grad_prologue_args(prologue, x, acc)
    scale, shift, act_lo, act_hi, acts = prologue_args(prologue, x, acc)
    return x, scale, shift, scale, act_lo, act_hi, acts


@triton.jit
def load_operand(
    x_ptr,
    saved_ptr,
    offs,
    mask2d,
    offs_c,
    c_mask,
    C,
    scale_ptr,
    shift_ptr,
    coef_ptr,
    act_lo,
    act_hi,
    pos,
    neg,
    PROLOGUE: tl.constexpr,
    ACC: tl.constexpr,
):
    """A [rows, channels] tile at element offsets ``offs``, through its prologue: BN + activation of the
    forward, or their backward (which also reads the saved pre-norm tensor at the same offsets)."""
    a = tl.load(x_ptr + offs, mask=mask2d, other=0.0)
    if PROLOGUE == 1:
        a = apply_prologue(a, offs_c, mask2d, scale_ptr, shift_ptr, c_mask, act_lo, act_hi, pos, neg, ACC)
    elif PROLOGUE == 2:
        u = tl.load(saved_ptr + offs, mask=mask2d, other=0.0)
        a = apply_grad_prologue(
            a, u, offs_c, mask2d, scale_ptr, shift_ptr, coef_ptr, C, c_mask, act_lo, act_hi, pos, neg, ACC
        )
    return a
