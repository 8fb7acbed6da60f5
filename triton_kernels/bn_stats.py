"""Batch-norm statistics and coefficients from per-tile partial sums, one launch per layer each way.

``bn_finalize`` turns the [tiles, FIELDS, C] moments of an epilogue (:mod:`.moments`), or the running
statistics in eval mode, into the mean, 1/std, unbiased variance (for the running statistics) and the
prologue's scale / shift (``gamma * invstd``, ``beta - mean * scale``), computing in float64.

``bn_backward_finalize`` does the same for the backward: from the [tiles, 2, C] partials of sum(g) and
sum(g * xhat) it writes those sums as d(beta) and d(gamma), and the [5, C] coefficients of
:class:`~.bn_tiles.GradPrologue`, which applies dBN inside the next convolutions' loads.

Done with torch ops, each was about a dozen small launches per layer, and on a GPU the block is bound
by launching work (benchmarks/results/NOTES.md), not by this arithmetic. For the same reason a layer's
affine parameters may come as two tensors (the coder's and the learner's, split at channel ``split``),
read where they lie instead of concatenated first, and the outputs may be given as views of the
block's statistics vectors.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .launch import Pair, device_constants, interpreting, inverse_sqrt, load_split, split_halves
from .moments import FIELD_COUNT, FIELDS, merge_moments


def _grid(c: int) -> tuple[int, int]:
    """(programs, BLOCK_C) over c channels; BLOCK_T, the partial rows per step, follows."""
    block_c = 16 if interpreting() else min(256, triton.next_power_of_2(max(c, 1)))
    return triton.cdiv(c, block_c), block_c


def _block_t() -> int:
    return 16 if interpreting() else 32


@triton.jit
def _reduce_partials(part_ptr, tiles, C, offs_c, c_mask, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    """The two [C] sums of [tiles, 2, C] partials, in float64 and in tile order (deterministic)."""
    s = tl.zeros((BLOCK_C,), dtype=tl.float64)
    s2 = tl.zeros((BLOCK_C,), dtype=tl.float64)
    for t0 in range(0, tiles, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        mask = (offs_t < tiles)[:, None] & c_mask[None, :]
        ptrs = part_ptr + offs_t[:, None].to(tl.int64) * 2 * C + offs_c[None, :]
        s += tl.sum(tl.load(ptrs, mask=mask, other=0.0).to(tl.float64), axis=0)
        s2 += tl.sum(tl.load(ptrs + C, mask=mask, other=0.0).to(tl.float64), axis=0)
    return s, s2


@triton.jit
def _bn_finalize_kernel(
    part_ptr,
    tiles,
    C,
    const_ptr,
    run_mean_ptr,
    run_var_ptr,
    gamma_lo,
    gamma_hi,
    beta_lo,
    beta_hi,
    split,
    mean_ptr,
    invstd_ptr,
    var_ptr,
    scale_ptr,
    shift_ptr,
    BATCH: tl.constexpr,
    F64: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """mean, invstd, unbiased var and the prologue's scale (gamma * invstd) and shift (beta - mean * scale)
    of BLOCK_C channels, in float64: from the merged per-tile moments ``part`` [tiles, FIELDS, C] (BATCH), or
    from the running statistics (eval); eps is ``const_ptr[0]``; gamma and beta are split at ``split``."""
    offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = offs_c < C
    eps = tl.load(const_ptr)
    if BATCH:
        count, mean, m2 = merge_moments(part_ptr, tiles, FIELDS * C, C, offs_c, c_mask, BLOCK_T, BLOCK_C)
        var = m2 / tl.maximum(count, 1.0)
        unbiased = m2 / tl.maximum(count - 1.0, 1.0)
    else:  # eval: the running statistics
        mean = tl.load(run_mean_ptr + offs_c, mask=c_mask, other=0.0).to(tl.float64)
        var = tl.load(run_var_ptr + offs_c, mask=c_mask, other=0.0).to(tl.float64)
        unbiased = var
    invstd = inverse_sqrt(var + eps, F64)
    sc = load_split(gamma_lo, gamma_hi, offs_c, split, c_mask).to(tl.float64) * invstd
    sh = load_split(beta_lo, beta_hi, offs_c, split, c_mask).to(tl.float64) - mean * sc
    tl.store(mean_ptr + offs_c, mean.to(mean_ptr.dtype.element_ty), mask=c_mask)
    tl.store(invstd_ptr + offs_c, invstd.to(invstd_ptr.dtype.element_ty), mask=c_mask)
    tl.store(var_ptr + offs_c, unbiased.to(var_ptr.dtype.element_ty), mask=c_mask)
    tl.store(scale_ptr + offs_c, sc.to(scale_ptr.dtype.element_ty), mask=c_mask)
    tl.store(shift_ptr + offs_c, sh.to(shift_ptr.dtype.element_ty), mask=c_mask)


def bn_finalize(
    part: Optional[Tensor],
    eps: float,
    gamma: Pair,
    beta: Pair,
    *,
    running: Optional[tuple[Tensor, Tensor]] = None,
    out: Optional[tuple[Tensor, Tensor, Tensor]] = None,
    dtype: Optional[torch.dtype] = None,
) -> tuple[Tensor, ...]:
    """(mean, invstd, unbiased var, scale, shift), each [C], from ``part`` [tiles, FIELDS, C] (per-tile
    moments, :mod:`.moments`), or in eval mode from ``running`` (mean, var).

    gamma / beta: [C], or the (coder, learner) halves. ``out``: (mean, invstd, var) to write into
    (contiguous views of the block's statistics vectors, say); otherwise new tensors in ``dtype``
    (default: the partials' dtype)."""
    like = part if running is None else running[0]
    if running is None and (part.dim() != 3 or part.shape[1] != FIELD_COUNT):
        raise ValueError(f"partials {tuple(part.shape)} are not [tiles, {FIELD_COUNT}, C] moments")
    c = part.shape[2] if running is None else running[0].shape[0]
    g_lo, g_hi, split = split_halves(gamma, c)
    b_lo, b_hi, _ = split_halves(beta, c)
    dtype = dtype or like.dtype
    if out is None:
        out = tuple(torch.empty(c, device=like.device, dtype=dtype) for _ in range(3))
    if any(t.shape != (c,) or not t.is_contiguous() for t in out):
        raise ValueError(f"the outputs must be contiguous [{c}] tensors")
    scale, shift = (torch.empty(c, device=like.device, dtype=out[0].dtype) for _ in range(2))
    programs, block_c = _grid(c)
    if c > 0:
        run_mean, run_var = running if running is not None else (part, part)
        _bn_finalize_kernel[(programs,)](
            part if running is None else run_mean,
            0 if running is not None else part.shape[0],
            c,
            device_constants((eps,), like.device, torch.float64),
            run_mean.contiguous(),
            run_var.contiguous(),
            g_lo,
            g_hi,
            b_lo,
            b_hi,
            split,
            *out,
            scale,
            shift,
            BATCH=running is None,
            F64=out[0].dtype == torch.float64,
            BLOCK_T=_block_t(),
            BLOCK_C=block_c,
        )
    return (*out, scale, shift)


@triton.jit
def _bn_backward_finalize_kernel(
    part_ptr,
    tiles,
    C,
    const_ptr,
    mean_ptr,
    invstd_ptr,
    gamma_lo,
    gamma_hi,
    beta_lo,
    beta_hi,
    split,
    coef_ptr,
    dgamma_lo,
    dgamma_hi,
    dbeta_lo,
    dbeta_hi,
    TRAINING: tl.constexpr,
    GRAD_F64: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """The backward's per-channel coefficients for BLOCK_C channels: from the [tiles, 2, C] partials of
    sum(g) and sum(g * xhat), d(beta) and d(gamma) (split at ``split`` like gamma and beta) and ``coef``
    [5, C] (a, mean, b, k and the forward's shift) of :class:`~.bn_tiles.GradPrologue`; TRAINING adds the
    batch statistics' own gradient (b, k), which eval has not."""
    offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = offs_c < C
    s, sx = _reduce_partials(part_ptr, tiles, C, offs_c, c_mask, BLOCK_T, BLOCK_C)
    mean = tl.load(mean_ptr + offs_c, mask=c_mask, other=0.0).to(tl.float64)
    invstd = tl.load(invstd_ptr + offs_c, mask=c_mask, other=0.0).to(tl.float64)
    a = load_split(gamma_lo, gamma_hi, offs_c, split, c_mask).to(tl.float64) * invstd
    shift = load_split(beta_lo, beta_hi, offs_c, split, c_mask).to(tl.float64) - mean * a
    if TRAINING:
        count = tl.load(const_ptr + 1)
        b = -a * invstd * (sx / count)
        k = -a * (s / count)
    else:  # running statistics are constants: no gradient through them
        b = tl.zeros((BLOCK_C,), dtype=tl.float64)
        k = tl.zeros((BLOCK_C,), dtype=tl.float64)
    out_ty = coef_ptr.dtype.element_ty
    tl.store(coef_ptr + offs_c, a.to(out_ty), mask=c_mask)
    tl.store(coef_ptr + C + offs_c, mean.to(out_ty), mask=c_mask)
    tl.store(coef_ptr + 2 * C + offs_c, b.to(out_ty), mask=c_mask)
    tl.store(coef_ptr + 3 * C + offs_c, k.to(out_ty), mask=c_mask)
    tl.store(coef_ptr + 4 * C + offs_c, shift.to(out_ty), mask=c_mask)
    # d(gamma) = sum(g * xhat), d(beta) = sum(g), each into its half's own tensor; through float32 for
    # narrower parameters (the interpreter converts float64 to bfloat16 wrongly)
    if not GRAD_F64:
        s = s.to(tl.float32)
        sx = sx.to(tl.float32)
    lo = c_mask & (offs_c < split)
    hi = c_mask & (offs_c >= split)
    tl.store(dgamma_lo + offs_c, sx.to(dgamma_lo.dtype.element_ty), mask=lo)
    tl.store(dbeta_lo + offs_c, s.to(dbeta_lo.dtype.element_ty), mask=lo)
    tl.store(dgamma_hi + (offs_c - split), sx.to(dgamma_hi.dtype.element_ty), mask=hi)
    tl.store(dbeta_hi + (offs_c - split), s.to(dbeta_hi.dtype.element_ty), mask=hi)


def bn_backward_finalize(
    part: Tensor, count: int, mean: Tensor, invstd: Tensor, gamma: Pair, beta: Pair, training: bool
) -> tuple[Tensor, list[Tensor]]:
    """(coef, grads) from ``part`` [tiles, 2, C], per-tile sum(g) and sum(g * xhat) over ``count`` rows.

    coef: [5, C] in the partials' dtype, rows (a, mean, b, k, shift): the first four are
    :class:`~.bn_tiles.GradPrologue`'s ``coef``; the forward's scale is ``a`` (gamma * invstd) and its
    shift the fifth row (for the activation's derivative, and layer 2's weight-gradient prologue).
    grads: [d(gamma), d(beta)] as new tensors in gamma's dtype, or [d(gamma_lo), d(beta_lo),
    d(gamma_hi), d(beta_hi)] when gamma and beta come as halves."""
    tiles, two, c = part.shape
    if two != 2 or mean.shape != (c,) or invstd.shape != (c,):
        raise ValueError(f"partials {tuple(part.shape)} and statistics {tuple(mean.shape)} do not fit")
    g_lo, g_hi, split = split_halves(gamma, c)
    b_lo, b_hi, _ = split_halves(beta, c)
    coef = torch.empty((5, c), device=part.device, dtype=part.dtype)
    grads = [torch.empty(t.shape, device=t.device, dtype=t.dtype) for t in (g_lo, b_lo)]
    if isinstance(gamma, Tensor):
        dg_hi, db_hi = grads  # never written: every channel is below the split
    else:
        grads += [torch.empty(t.shape, device=t.device, dtype=t.dtype) for t in (g_hi, b_hi)]
        dg_hi, db_hi = grads[2:]
    programs, block_c = _grid(c)
    if c > 0:
        _bn_backward_finalize_kernel[(programs,)](
            part.contiguous(),
            tiles,
            c,
            device_constants((0.0, max(count, 1)), part.device, torch.float64),
            mean.contiguous(),
            invstd.contiguous(),
            g_lo,
            g_hi,
            b_lo,
            b_hi,
            split,
            coef,
            grads[0],
            dg_hi,
            grads[1],
            db_hi,
            TRAINING=training,
            GRAD_F64=grads[0].dtype == torch.float64,
            BLOCK_T=_block_t(),
            BLOCK_C=block_c,
        )
    return coef, grads
