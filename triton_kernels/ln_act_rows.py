"""The memory-bound passes of PNNHLinear over [tokens, channels] rows:

- :func:`ln_act_forward`: layer norm + activation with precomputed row statistics (the last layer's
  output; the hidden layer's is applied inside the next product's prologue instead);
- :func:`ln_act_backward`: dActivation fused into the layer-norm backward of a column range, recomputing
  the normalised input from the pre-norm one; also returns d(gamma), d(beta) from per-program column
  partials summed in float64 (no atomics, deterministic).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .common import acc_dtype, act_vector, interpreting, tl_dtype
from .linear_gemm import activation_derivative, ln_act_tile


def _blocks(width: int) -> tuple[int, int, int]:
    """(BLOCK_M rows, BLOCK_C columns, warps)."""
    if interpreting():
        return 16, 16, 1
    block_c = min(256, triton.next_power_of_2(max(width, 1)))
    return max(4, 4096 // block_c), block_c, 4


@triton.jit
def _ln_act_fwd_kernel(u_ptr, y_ptr, stats_ptr, gamma_ptr, beta_ptr, act_ptr, T, C, split,
                       GELU: tl.constexpr, ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    m_mask, c_mask = offs_m < T, offs_c < C
    ptrs = offs_m[:, None].to(tl.int64) * C + offs_c[None, :]
    u = tl.load(u_ptr + ptrs, mask=m_mask[:, None] & c_mask[None, :], other=0.0)
    y = ln_act_tile(u, offs_m, m_mask, offs_c, c_mask, stats_ptr, T, gamma_ptr, beta_ptr, split,
                    tl.load(act_ptr), tl.load(act_ptr + 1), GELU, ACC)
    tl.store(y_ptr + ptrs, y.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & c_mask[None, :])


@triton.jit
def _grad_tile(dy_ptr, sdy, z_ptr, sz, rows, m_mask, cols, c_mask, mean, rstd, gamma_ptr, beta_ptr, pos, neg,
               ACT: tl.constexpr, GELU: tl.constexpr, ACC: tl.constexpr):
    """(xhat, g = dy * act'(y), dxhat = g * gamma) of a tile, zero outside the masks."""
    mask = m_mask[:, None] & c_mask[None, :]
    z = tl.load(z_ptr + rows[:, None] * sz + cols[None, :], mask=mask, other=0.0).to(ACC)
    dy = tl.load(dy_ptr + rows[:, None] * sdy + cols[None, :], mask=mask, other=0.0).to(ACC)
    xhat = tl.where(mask, (z - mean[:, None]) * rstd[:, None], 0.0)
    gam = tl.load(gamma_ptr + cols, mask=c_mask, other=0.0)
    if ACT:
        bet = tl.load(beta_ptr + cols, mask=c_mask, other=0.0)
        dy = dy * activation_derivative(xhat * gam[None, :] + bet[None, :], pos, neg, GELU)
    g = tl.where(mask, dy, 0.0)
    return xhat, g, g * gam[None, :]


@triton.jit
def _ln_act_bwd_kernel(dy_ptr, sdy, z_ptr, sz, dz_ptr, sdz, part_ptr, mean_ptr, rstd_ptr, gamma_ptr, beta_ptr,
                       act_ptr, T, lo, width,
                       ACT: tl.constexpr, GELU: tl.constexpr, ACC: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    pid = tl.program_id(0)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < T
    rows = offs_m.to(tl.int64)
    mean = tl.load(mean_ptr + offs_m, mask=m_mask, other=0.0)
    rstd = tl.load(rstd_ptr + offs_m, mask=m_mask, other=0.0)
    pos = tl.load(act_ptr)
    neg = tl.load(act_ptr + 1)
    # pass 1: the row means of dxhat and dxhat * xhat (dxhat = g * gamma)
    s1 = tl.zeros((BLOCK_M,), dtype=ACC)
    s2 = tl.zeros((BLOCK_M,), dtype=ACC)
    for c0 in range(0, width, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        c_mask = offs_c < width
        xhat, g, dxh = _grad_tile(dy_ptr + lo, sdy, z_ptr + lo, sz, rows, m_mask, offs_c, c_mask, mean, rstd,
                                  gamma_ptr, beta_ptr, pos, neg, ACT, GELU, ACC)
        s1 += tl.sum(dxh, axis=1)
        s2 += tl.sum(dxh * xhat, axis=1)
    s1 = s1 / width
    s2 = s2 / width
    # pass 2: dz, and this program's column partials of d(gamma) = sum g * xhat and d(beta) = sum g
    for c0 in range(0, width, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        c_mask = offs_c < width
        xhat, g, dxh = _grad_tile(dy_ptr + lo, sdy, z_ptr + lo, sz, rows, m_mask, offs_c, c_mask, mean, rstd,
                                  gamma_ptr, beta_ptr, pos, neg, ACT, GELU, ACC)
        dz = rstd[:, None] * (dxh - s1[:, None] - xhat * s2[:, None])
        mask = m_mask[:, None] & c_mask[None, :]
        tl.store(dz_ptr + lo + rows[:, None] * sdz + offs_c[None, :], dz.to(dz_ptr.dtype.element_ty), mask=mask)
        part = part_ptr + pid.to(tl.int64) * 2 * width
        tl.store(part + offs_c, tl.sum(g * xhat, axis=0), mask=c_mask)
        tl.store(part + width + offs_c, tl.sum(g, axis=0), mask=c_mask)


def ln_act_forward(u: Tensor, stats: Tensor, gamma: Tensor, beta: Tensor, act: bool, gelu: bool,
                   slope: float, scale: float) -> Tensor:
    """act(LN(u)) for contiguous u [T, C] with row statistics ``stats`` [4, T] (both segments equal)."""
    t, c = u.shape
    acc = acc_dtype(u.dtype)
    y = torch.empty_like(u)
    block_m, block_c, warps = _blocks(c)
    if t > 0 and c > 0:
        _ln_act_fwd_kernel[(triton.cdiv(t, block_m), triton.cdiv(c, block_c))](
            u, y, stats.to(acc).contiguous(), gamma.to(acc).contiguous(), beta.to(acc).contiguous(),
            act_vector(slope, scale, u, acc), t, c, 0 if act else c,
            GELU=gelu, ACC=tl_dtype(acc), BLOCK_M=block_m, BLOCK_C=block_c, num_warps=warps,
        )
    return y


def ln_act_backward(dy: Tensor, z: Tensor, dz: Tensor, lo: int, width: int, mean: Tensor, rstd: Tensor,
                    gamma: Tensor, beta: Tensor, act: bool, gelu: bool, slope: float, scale: float) -> tuple[Tensor, Tensor]:
    """Writes dz[:, lo:lo+width] for y = act(LN(z[:, lo:lo+width])) given dy[:, lo:lo+width] (rows with unit
    column stride); returns (d gamma, d beta) in float64."""
    t = z.shape[0]
    for name, m in (("dy", dy), ("z", z), ("dz", dz)):
        if m.dim() != 2 or m.stride(1) != 1 or m.shape[0] != t or m.shape[1] < lo + width:
            raise ValueError(f"{name} must be a [{t}, >= {lo + width}] matrix with unit column stride, got {tuple(m.shape)}")
    acc = acc_dtype(z.dtype)
    block_m, block_c, warps = _blocks(width)
    programs = triton.cdiv(t, block_m)
    part = torch.zeros((max(programs, 1), 2, width), device=z.device, dtype=acc)
    if t > 0 and width > 0:
        _ln_act_bwd_kernel[(programs,)](
            dy, dy.stride(0), z, z.stride(0), dz, dz.stride(0), part,
            mean.to(acc).contiguous(), rstd.to(acc).contiguous(), gamma.to(acc).contiguous(), beta.to(acc).contiguous(),
            act_vector(slope, scale, z, acc), t, lo, width,
            ACT=act, GELU=gelu, ACC=tl_dtype(acc), BLOCK_M=block_m, BLOCK_C=block_c, num_warps=warps,
        )
    sums = part.sum(0, dtype=torch.float64)
    return sums[0], sums[1]
