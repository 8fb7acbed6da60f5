"""The batch-norm load prologues of the convolution kernels: BN-apply + activation on a forward input
(:class:`Prologue`), and their backward on an output gradient (:class:`GradPrologue`), applied to a
tile as it is loaded so the normalised input and the pre-norm gradient never exist in memory."""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .launch import act_vector, as_acc, dummy


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


def prologue_args(prologue: Optional[Prologue], like: Tensor, acc: torch.dtype) -> tuple:
    """(scale, shift, act_lo, act_hi, act_vector) kernel arguments; dummies without a prologue."""
    if prologue is None:
        unused = dummy(like, acc)
        return unused, unused, 0, 0, unused
    p = prologue
    acts = act_vector(p.slope, p.act_scale, like, acc)
    return as_acc(p.scale, acc), as_acc(p.shift, acc), p.act_lo, p.act_hi, acts


def _same_layout(a: Tensor, b: Tensor) -> bool:
    """Same shape, and the same strides along every dimension longer than 1 (a stride of a size-1
    dimension is never used: a channels_last and an NCHW view of one channel are the same memory)."""
    return a.shape == b.shape and all(sa == sb for sa, sb, n in zip(a.stride(), b.stride(), a.shape) if n > 1)


def grad_prologue_args(prologue: Optional[GradPrologue], like: Tensor, acc: torch.dtype) -> tuple:
    """(saved, scale, shift, coef, act_lo, act_hi, act_vector) kernel arguments; dummies without one.
    ``like``: the gradient the prologue rides on (``saved`` must match its shape and strides)."""
    if prologue is None:
        unused = dummy(like, acc)
        return like, unused, unused, unused, 0, 0, unused
    p = prologue
    if not _same_layout(p.saved, like):
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
