"""The memory-bound passes of PNNHLinear over [tokens, channels] rows:

- :func:`ln_act_forward`: layer norm + activation with precomputed row statistics (the last layer's
  output; the hidden layer's is applied inside the next product's prologue instead);
- :func:`ln_grad_sums`: the reductions of the fused dActivation + dLayerNorm, recomputing the normalised
  input from the pre-norm one: each token's coefficients, which the gradient products then apply while
  loading (:class:`~.ln_tiles.LnGradPrologue`: the input gradient itself is never stored), and
  d(gamma), d(beta) from per-program column partials summed in float64 (no atomics, deterministic).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .launch import acc_dtype, act_vector, as_acc, interpreting, load_split, tl_dtype
from .ln_tiles import LnGradPrologue, LnPrologue, affine_pointers, ln_act_tile, ln_grad_parts, segment_value


def _blocks(width: int) -> tuple[int, int, int]:
    """(BLOCK_M rows, BLOCK_C columns, warps)."""
    if interpreting():
        return 16, 16, 1
    block_c = min(256, triton.next_power_of_2(max(width, 1)))
    return max(4, 4096 // block_c), block_c, 4


@triton.jit
def _ln_act_fwd_kernel(
    u_ptr,
    y_ptr,
    stats_ptr,
    g_lo,
    g_hi,
    b_lo,
    b_hi,
    act_ptr,
    T,
    C,
    split,
    GELU: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """One [BLOCK_M tokens, BLOCK_C channels] tile of y = act(LN(u)) (:func:`~.ln_tiles.ln_act_tile`):
    u and y [T, C] contiguous; ``stats`` [4, T] each token's mean and rstd of its two segments (split at
    channel ``split``, gamma / beta ``g_lo``/``g_hi``, ``b_lo``/``b_hi``); the activation's constants at
    ``act_ptr``."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    m_mask, c_mask = offs_m < T, offs_c < C
    ptrs = offs_m[:, None].to(tl.int64) * C + offs_c[None, :]
    u = tl.load(u_ptr + ptrs, mask=m_mask[:, None] & c_mask[None, :], other=0.0)
    y = ln_act_tile(
        u,
        offs_m[:, None],
        m_mask[:, None],
        offs_c[None, :],
        c_mask[None, :],
        stats_ptr,
        T,
        g_lo,
        g_hi,
        b_lo,
        b_hi,
        split,
        tl.load(act_ptr),
        tl.load(act_ptr + 1),
        GELU,
        ACC,
    )
    tl.store(y_ptr + ptrs, y.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & c_mask[None, :])


@triton.jit
def _ln_grad_sums_kernel(
    dy_ptr,
    stride_dy_m,
    u_ptr,
    stride_u_m,
    stats_ptr,
    g_lo,
    g_hi,
    b_lo,
    b_hi,
    act_ptr,
    coef_ptr,
    part_ptr,
    T,
    C,
    split,
    width_lo,
    width_hi,
    GELU: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """One read of dy and u per program of BLOCK_M tokens: the row sums of dxhat = g * gamma and
    dxhat * xhat per segment (-> the coefficients) and the column partials of d(gamma), d(beta)."""
    pid = tl.program_id(0)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < T
    tok, tok_mask = offs_m[:, None], m_mask[:, None]
    rows = tok.to(tl.int64)
    pos = tl.load(act_ptr)
    neg = tl.load(act_ptr + 1)
    s1_lo = tl.zeros((BLOCK_M,), dtype=ACC)
    s2_lo = tl.zeros((BLOCK_M,), dtype=ACC)
    s1_hi = tl.zeros((BLOCK_M,), dtype=ACC)
    s2_hi = tl.zeros((BLOCK_M,), dtype=ACC)
    part = part_ptr + pid.to(tl.int64) * 2 * C
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        c_mask = offs_c < C
        ch, ch_mask = offs_c[None, :], c_mask[None, :]
        mask = tok_mask & ch_mask
        second = ch >= split
        dy = tl.load(dy_ptr + rows * stride_dy_m + ch, mask=mask, other=0.0)
        u = tl.load(u_ptr + rows * stride_u_m + ch, mask=mask, other=0.0)
        mean = segment_value(stats_ptr, 0, T, tok, tok_mask, second)
        rstd = segment_value(stats_ptr, 1, T, tok, tok_mask, second)
        gam = load_split(g_lo, g_hi, ch, split, ch_mask)
        bet = load_split(b_lo, b_hi, ch, split, ch_mask)
        xhat, g = ln_grad_parts(dy, u, mean, rstd, gam, bet, second, mask, pos, neg, GELU, ACC)
        dxh = g * gam
        s1_lo += tl.sum(tl.where(second, 0.0, dxh), axis=1)
        s2_lo += tl.sum(tl.where(second, 0.0, dxh * xhat), axis=1)
        s1_hi += tl.sum(tl.where(second, dxh, 0.0), axis=1)
        s2_hi += tl.sum(tl.where(second, dxh * xhat, 0.0), axis=1)
        tl.store(part + offs_c, tl.sum(g * xhat, axis=0), mask=c_mask)
        tl.store(part + C + offs_c, tl.sum(g, axis=0), mask=c_mask)
    tl.store(coef_ptr + offs_m, s1_lo / width_lo, mask=m_mask)
    tl.store(coef_ptr + T + offs_m, s2_lo / width_lo, mask=m_mask)
    tl.store(coef_ptr + 2 * T + offs_m, s1_hi / width_hi, mask=m_mask)
    tl.store(coef_ptr + 3 * T + offs_m, s2_hi / width_hi, mask=m_mask)


def ln_act_forward(
    u: Tensor, stats: Tensor, gamma: Tensor, beta: Tensor, act: bool, gelu: bool, slope: float, scale: float
) -> Tensor:
    """act(LN(u)) for contiguous u [T, C] with row statistics ``stats`` [4, T] (both segments equal)."""
    t, c = u.shape
    acc = acc_dtype(u.dtype)
    y = torch.empty_like(u)
    block_m, block_c, warps = _blocks(c)
    split = 0 if act else c
    if t > 0 and c > 0:
        _ln_act_fwd_kernel[(triton.cdiv(t, block_m), triton.cdiv(c, block_c))](
            u,
            y,
            as_acc(stats, acc),
            *affine_pointers(gamma, beta, split, acc),
            act_vector(slope, scale, u, acc),
            t,
            c,
            split,
            GELU=gelu,
            ACC=tl_dtype(acc),
            BLOCK_M=block_m,
            BLOCK_C=block_c,
            num_warps=warps,
        )
    return y


def ln_grad_sums(dy: Tensor, u: Tensor, norm: LnPrologue) -> tuple[LnGradPrologue, Tensor, Tensor]:
    """The backward of ``y = act(LN(u))`` (``norm``: the forward's statistics, parameters, segments and
    activation) for dy and u [T, C] (unit column stride): the :class:`LnGradPrologue` that turns dy into
    du inside the gradient products, and (d gamma, d beta) over all C columns in float64."""
    t, c = u.shape
    for name, m in (("dy", dy), ("u", u)):
        if m.dim() != 2 or m.shape != (t, c) or (m.numel() and m.stride(1) != 1):
            raise ValueError(
                f"{name} must be a [{t}, {c}] matrix with unit column stride, got {tuple(m.shape)} / {m.stride()}"
            )
    if norm.stats.shape != (4, t):
        raise ValueError(f"the row statistics must be [4, {t}], got {tuple(norm.stats.shape)}")
    acc = acc_dtype(u.dtype)
    block_m, block_c, warps = _blocks(c)
    programs = triton.cdiv(t, block_m)
    coef = torch.empty((4, t), device=u.device, dtype=acc)
    # every program writes its row of column partials; zeros only for an empty launch
    part = (torch.empty if t > 0 and c > 0 else torch.zeros)((max(programs, 1), 2, c), device=u.device, dtype=acc)
    if t > 0 and c > 0:
        _ln_grad_sums_kernel[(programs,)](
            dy,
            dy.stride(0),
            u,
            u.stride(0),
            as_acc(norm.stats, acc),
            *affine_pointers(norm.gamma, norm.beta, norm.split, acc),
            act_vector(norm.slope, norm.scale, u, acc),
            coef,
            part,
            t,
            c,
            norm.split,
            max(min(norm.split, c), 1),
            max(c - norm.split, 1),  # the segments' widths (an empty one divides 0)
            GELU=norm.gelu,
            ACC=tl_dtype(acc),
            BLOCK_M=block_m,
            BLOCK_C=block_c,
            num_warps=warps,
        )
    sums = part.sum(0, dtype=torch.float64)
    grad = LnGradPrologue(norm, u, coef)
    return grad, sums[0], sums[1]
