"""The memory-bound passes of the block over [rows, channels] tensors (NHWC pixels x channels):

- :func:`bn_act_forward`: ``act(scale[c] * z + shift[c])`` (activation on a channel range);
- :func:`bn_act_backward_sums`: per-channel sum(g) and sum(g * xhat), g = dy * act'(y), recomputing
  y = gamma * xhat + beta from the pre-norm z (these are also d(beta) and d(gamma));
  The apply, dz = gamma * invstd * (g - mean(g) - xhat * mean(g * xhat)) in training (gamma * invstd
  * g in eval), is no pass of its own: it runs inside the loads of the gradient convolutions that
  consume dz (:class:`~.bn_tiles.GradPrologue`).

Reductions write per-program partials that are summed in float64 afterwards: no atomics, deterministic.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .bn_tiles import act_derivative
from .launch import Pair, acc_dtype, act_vector, as_acc, interpreting, load_split, split_halves, tl_dtype

_ROWS_PER_PROGRAM = 2048  # of the reduction pass; a multiple of BLOCK_M


def _blocks(channels: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_C, warps): ~4K elements a tile on a GPU, small tiles in the interpreter."""
    if interpreting():
        return 16, 16, 1
    block_c = min(128, triton.next_power_of_2(max(channels, 1)))
    return max(16, 4096 // block_c), block_c, 4


@triton.jit
def _bn_act_fwd_kernel(
    z_ptr,
    out_ptr,
    scale_ptr,
    shift_ptr,
    M,
    C,
    act_lo,
    act_hi,
    act_ptr,
    HW,
    stride_out_n,
    stride_out_c,
    stride_out_hw,
    ACC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """One [BLOCK_M pixels, BLOCK_C channels] tile of out = act(scale[c] * z + shift[c]): z [M, C]
    contiguous rows; the activation (constants at ``act_ptr``) on channels [act_lo, act_hi) only; out
    written through (image, channel, pixel) strides with HW pixels an image: rows, or an NCHW map in any
    memory format."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = offs_c < C
    mask = (offs_m < M)[:, None] & c_mask[None, :]
    ptrs = offs_m[:, None].to(tl.int64) * C + offs_c[None, :]
    z = tl.load(z_ptr + ptrs, mask=mask, other=0.0).to(ACC)
    sc = tl.load(scale_ptr + offs_c, mask=c_mask, other=0.0)
    sh = tl.load(shift_ptr + offs_c, mask=c_mask, other=0.0)
    y = z * sc[None, :] + sh[None, :]
    in_act = ((offs_c >= act_lo) & (offs_c < act_hi))[None, :]
    y = y * act_derivative(y, in_act, tl.load(act_ptr), tl.load(act_ptr + 1))  # the scaled leaky family is y * act'(y)
    pixel_offs = (offs_m // HW).to(tl.int64) * stride_out_n + (offs_m % HW).to(tl.int64) * stride_out_hw
    out_offs = pixel_offs[:, None] + offs_c[None, :].to(tl.int64) * stride_out_c
    tl.store(out_ptr + out_offs, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _normalised_and_grad(
    dy_ptr,
    z_ptr,
    ptrs,
    mask,
    offs_c,
    c_mask,
    mean_ptr,
    invstd_ptr,
    gamma_lo,
    gamma_hi,
    beta_lo,
    beta_hi,
    split,
    act_lo,
    act_hi,
    act_ptr,
    ACC: tl.constexpr,
):
    """(xhat, g) of a tile: the normalised input and the gradient through the activation."""
    mu = tl.load(mean_ptr + offs_c, mask=c_mask, other=0.0)
    inv = tl.load(invstd_ptr + offs_c, mask=c_mask, other=0.0)
    gam = load_split(gamma_lo, gamma_hi, offs_c, split, c_mask).to(ACC)
    bet = load_split(beta_lo, beta_hi, offs_c, split, c_mask).to(ACC)
    xhat = (tl.load(z_ptr + ptrs, mask=mask, other=0.0).to(ACC) - mu[None, :]) * inv[None, :]
    y = xhat * gam[None, :] + bet[None, :]
    in_act = ((offs_c >= act_lo) & (offs_c < act_hi))[None, :]
    d = act_derivative(y, in_act, tl.load(act_ptr), tl.load(act_ptr + 1))
    g = tl.load(dy_ptr + ptrs, mask=mask, other=0.0).to(ACC) * d
    return xhat, tl.where(mask, g, 0.0)


@triton.jit
def _bn_act_bwd_sums_kernel(
    dy_ptr,
    z_ptr,
    part_ptr,
    mean_ptr,
    invstd_ptr,
    gamma_lo,
    gamma_hi,
    beta_lo,
    beta_hi,
    split,
    M,
    C,
    act_lo,
    act_hi,
    act_ptr,
    rows_per_program,
    ACC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Partial sums of dAct + dBN over ``rows_per_program`` rows for BLOCK_C channels: row ``program_id(0)``
    of ``part`` [programs, 2, C] gets sum(g) and sum(g * xhat), g = dy * act'(y), with xhat and y recomputed
    from the pre-norm z (dy and z [M, C] contiguous; mean / invstd per channel; gamma and beta split at
    ``split``, :func:`_normalised_and_grad`)."""
    pid_m = tl.program_id(0)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = offs_c < C
    s = tl.zeros((BLOCK_C,), dtype=ACC)
    sx = tl.zeros((BLOCK_C,), dtype=ACC)
    m_start = pid_m * rows_per_program
    m_end = tl.minimum(m_start + rows_per_program, M)
    for m0 in range(m_start, m_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask = (offs_m < m_end)[:, None] & c_mask[None, :]
        ptrs = offs_m[:, None].to(tl.int64) * C + offs_c[None, :]
        xhat, g = _normalised_and_grad(
            dy_ptr,
            z_ptr,
            ptrs,
            mask,
            offs_c,
            c_mask,
            mean_ptr,
            invstd_ptr,
            gamma_lo,
            gamma_hi,
            beta_lo,
            beta_hi,
            split,
            act_lo,
            act_hi,
            act_ptr,
            ACC,
        )
        s += tl.sum(g, axis=0)
        sx += tl.sum(g * xhat, axis=0)
    row = part_ptr + pid_m.to(tl.int64) * 2 * C
    tl.store(row + offs_c, s, mask=c_mask)
    tl.store(row + C + offs_c, sx, mask=c_mask)


def _check_rows(*tensors: Tensor) -> None:
    for t in tensors:
        if t.dim() != 2 or not t.is_contiguous():
            raise ValueError("the row kernels take contiguous [rows, channels] tensors")


def bn_act_forward(
    z: Tensor,
    scale: Tensor,
    shift: Tensor,
    act_range: tuple[int, int],
    slope: float,
    act_scale: float,
    out_dtype=None,
    out: Optional[Tensor] = None,
) -> Tensor:
    """``act(scale * z + shift)`` of the rows ``z`` [N*H*W, C], as new rows, or written into ``out``, an
    [N, C, H, W] map in any memory format (so an NCHW block output needs no copy after the pass)."""
    _check_rows(z)
    m, c = z.shape
    acc = acc_dtype(z.dtype)
    if out is None:
        out = torch.empty((m, c), device=z.device, dtype=out_dtype or z.dtype)
        geometry = (m, 0, 1, c)  # one 'image' of m pixels: (HW, image, channel, pixel strides)
    else:
        n, oc, h, w = out.shape
        uneven_pixels = h > 1 and out.stride(2) != out.stride(3) * w  # pixels must sit at one stride
        if n * h * w != m or oc != c or uneven_pixels:
            raise ValueError(f"out {tuple(out.shape)} / {out.stride()} is not an [N, C, H, W] map of {m} x {c} rows")
        geometry = (h * w, out.stride(0), out.stride(1), out.stride(3))
    bm, bc, warps = _blocks(c)
    if out.numel():
        _bn_act_fwd_kernel[(triton.cdiv(m, bm), triton.cdiv(c, bc))](
            z,
            out,
            as_acc(scale, acc),
            as_acc(shift, acc),
            m,
            c,
            *act_range,
            act_vector(slope, act_scale, z, acc),
            *geometry,
            ACC=tl_dtype(acc),
            BLOCK_M=bm,
            BLOCK_C=bc,
            num_warps=warps,
        )
    return out


def bn_act_backward_sums(
    dy: Tensor,
    z: Tensor,
    mean: Tensor,
    invstd: Tensor,
    gamma: Pair,
    beta: Pair,
    act_range: tuple[int, int],
    slope: float,
    act_scale: float,
    reduce: bool = True,
) -> Tensor:
    """[2, C] float64: sum(g), sum(g * xhat); with ``reduce=False`` the per-program partials [programs,
    2, C] in the accumulation dtype (for :func:`~.bn_stats.bn_backward_finalize`). gamma / beta: [C],
    or the (coder, learner) halves."""
    _check_rows(dy, z)
    m, c = z.shape
    acc = acc_dtype(z.dtype)
    bm, bc, warps = _blocks(c)
    programs = max(1, triton.cdiv(m, _ROWS_PER_PROGRAM))
    part = torch.empty((programs, 2, c), device=z.device, dtype=acc)
    if m == 0:
        part.zero_()
        return part.sum(0, dtype=torch.float64) if reduce else part
    g_lo, g_hi, split = split_halves(gamma, c)
    b_lo, b_hi, _ = split_halves(beta, c)
    _bn_act_bwd_sums_kernel[(programs, triton.cdiv(c, bc))](
        dy,
        z,
        part,
        as_acc(mean, acc),
        as_acc(invstd, acc),
        g_lo,
        g_hi,
        b_lo,
        b_hi,
        split,
        m,
        c,
        *act_range,
        act_vector(slope, act_scale, z, acc),
        _ROWS_PER_PROGRAM,
        ACC=tl_dtype(acc),
        BLOCK_M=bm,
        BLOCK_C=bc,
        num_warps=warps,
    )
    return part.sum(0, dtype=torch.float64) if reduce else part
