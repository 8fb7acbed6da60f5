"""The matrix products of PNNHLinear, with its layer-norm fusions.

out[i, j] = sum_r P(A)[i, r] * B[r, j]   or   sum_r A[i, r] * P(B)[r, j]

- A and B are read through their strides, so transposed views cost nothing;
- the prologue P (:class:`LnPrologue`) is the previous layer's layer norm + activation, applied to one
  operand while it is loaded, so the normalised / activated tensor never exists in memory: on A for a
  forward product (A's rows are tokens), on B for a weight gradient (B's rows are tokens). Each token
  has two column segments with their own statistics: [0, split) the coder (no activation) and
  [split, width) the learner (activation);
- the epilogue writes per-tile row statistics of ``out`` for the next layer norm, per segment: the
  count, the tile mean and the sum of squared deviations from it, which :func:`row_statistics`
  combines with Chan's formula (a sum of squares minus a squared mean would cancel badly).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .common import acc_dtype, act_vector, dot_dtype, dot_precision, tl_dtype
from .tuning import gemm_configs, prune_by_width

_GPU_CONFIGS = [
    (128, 128, 32, 8, 3),
    (128, 64, 32, 4, 3),
    (64, 128, 32, 4, 3),
    (64, 64, 32, 4, 4),
    (128, 128, 64, 8, 3),
]


class LnPrologue(NamedTuple):
    """Layer norm + activation of a token-major operand: ``stats`` is [4, tokens] (mean and rstd of
    segment 0, then of segment 1); ``gamma``/``beta`` cover the whole width; columns >= ``split``
    use segment 1 and the activation (``gelu``, or the scaled leaky family of ``slope``/``scale``)."""

    stats: Tensor
    gamma: Tensor
    beta: Tensor
    split: int
    gelu: bool
    slope: float
    scale: float


@triton.jit
def activation(y, pos, neg, GELU: tl.constexpr):
    """scale * GELU(y) (pos = scale) or the scaled leaky family (pos, neg slopes)."""
    if GELU:
        return pos * y * 0.5 * (1.0 + tl.math.erf(y * 0.7071067811865476))
    return tl.where(y > 0, y * pos, y * neg)


@triton.jit
def activation_derivative(y, pos, neg, GELU: tl.constexpr):
    if GELU:
        cdf = 0.5 * (1.0 + tl.math.erf(y * 0.7071067811865476))
        pdf = tl.exp(-0.5 * y * y) * 0.3989422804014327
        return pos * (cdf + y * pdf)
    return tl.where(y > 0, pos, neg)


@triton.jit
def ln_act_tile(v, tok, tok_mask, ch, ch_mask, stats_ptr, T, gamma_ptr, beta_ptr, split, pos, neg,
                GELU: tl.constexpr, ACC: tl.constexpr):
    """Layer norm (+ activation on the second segment) of a [tokens, channels] tile; zero outside the masks."""
    second = ch >= split
    m0 = tl.load(stats_ptr + tok, mask=tok_mask, other=0.0)
    r0 = tl.load(stats_ptr + T + tok, mask=tok_mask, other=0.0)
    m1 = tl.load(stats_ptr + 2 * T + tok, mask=tok_mask, other=0.0)
    r1 = tl.load(stats_ptr + 3 * T + tok, mask=tok_mask, other=0.0)
    mean = tl.where(second[None, :], m1[:, None], m0[:, None])
    rstd = tl.where(second[None, :], r1[:, None], r0[:, None])
    g = tl.load(gamma_ptr + ch, mask=ch_mask, other=0.0)
    b = tl.load(beta_ptr + ch, mask=ch_mask, other=0.0)
    y = (v.to(ACC) - mean) * rstd * g[None, :] + b[None, :]
    y = tl.where(second[None, :], activation(y, pos, neg, GELU), y)
    return tl.where(tok_mask[:, None] & ch_mask[None, :], y, 0.0)


@triton.jit
def _segment_stats(part_ptr, acc, valid, seg_mask, offs_m, m_mask, M, ACC: tl.constexpr):
    """Store (count, mean, M2) of each row of the tile over the columns in ``seg_mask``."""
    mask = valid & seg_mask[None, :]
    count = tl.sum(seg_mask.to(ACC), axis=0)
    mean = tl.sum(tl.where(mask, acc, 0.0), axis=1) / tl.maximum(count, 1.0)
    dev = tl.where(mask, acc - mean[:, None], 0.0)
    tl.store(part_ptr + offs_m, tl.zeros_like(mean) + count, mask=m_mask)
    tl.store(part_ptr + M + offs_m, mean, mask=m_mask)
    tl.store(part_ptr + 2 * M + offs_m, tl.sum(dev * dev, axis=1), mask=m_mask)


@triton.autotune(
    configs=gemm_configs("BLOCK_M", "BLOCK_N", "BLOCK_K", _GPU_CONFIGS),
    key=["N", "K", "PRO_A", "PRO_B", "STATS", "GELU"],
    prune_configs_by={"early_config_prune": prune_by_width("N", "BLOCK_N", "K", "BLOCK_K")},
    reset_to_zero=["part_ptr"],
)
@triton.jit
def _ln_gemm_kernel(
    a_ptr, b_ptr, out_ptr, part_ptr, stats_ptr, gamma_ptr, beta_ptr, act_ptr,
    M, N, K, sam, sak, sbk, sbn, T, split, stats_split,
    PRO_A: tl.constexpr, PRO_B: tl.constexpr, STATS: tl.constexpr, GELU: tl.constexpr,
    ACC: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    pos = tl.load(act_ptr)
    neg = tl.load(act_ptr + 1)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        a = tl.load(a_ptr + offs_m[:, None].to(tl.int64) * sam + offs_k[None, :] * sak,
                    mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(b_ptr + offs_k[:, None].to(tl.int64) * sbk + offs_n[None, :] * sbn,
                    mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        if PRO_A:  # A's rows are tokens, its columns the normalised channels
            a = ln_act_tile(a, offs_m, m_mask, offs_k, k_mask, stats_ptr, T, gamma_ptr, beta_ptr, split, pos, neg, GELU, ACC)
        if PRO_B:  # B's rows are tokens
            b = ln_act_tile(b, offs_k, k_mask, offs_n, n_mask, stats_ptr, T, gamma_ptr, beta_ptr, split, pos, neg, GELU, ACC)
        acc = tl.dot(a.to(DOT), b.to(DOT), acc, input_precision=PRECISION)

    valid = m_mask[:, None] & n_mask[None, :]
    tl.store(out_ptr + offs_m[:, None].to(tl.int64) * N + offs_n[None, :], acc.to(out_ptr.dtype.element_ty), mask=valid)
    if STATS:  # part: [tiles of N, 2 segments, 3, M]
        tile = part_ptr + pid_n.to(tl.int64) * 6 * M
        _segment_stats(tile, acc, valid, n_mask & (offs_n < stats_split), offs_m, m_mask, M, ACC)
        _segment_stats(tile + 3 * M, acc, valid, n_mask & (offs_n >= stats_split), offs_m, m_mask, M, ACC)


def _min_block_n() -> int:
    return min(c.kwargs["BLOCK_N"] for c in _ln_gemm_kernel.configs)


def ln_gemm(
    a: Tensor,
    b: Tensor,
    *,
    prologue_a: Optional[LnPrologue] = None,
    prologue_b: Optional[LnPrologue] = None,
    stats_split: Optional[int] = None,
    out_dtype: Optional[torch.dtype] = None,
) -> tuple[Tensor, Optional[Tensor]]:
    """``a @ b`` ([M, K] @ [K, N], any strides) as a contiguous [M, N], with at most one prologue, and
    with ``stats_split`` the epilogue's row-statistics partials [tiles, 2, 3, M] of the segments
    [0, stats_split) and [stats_split, N) (see :func:`row_statistics`)."""
    if prologue_a is not None and prologue_b is not None:
        raise ValueError("one prologue per product")
    m, k = a.shape
    k2, n = b.shape
    if k != k2:
        raise ValueError(f"inner sizes differ: {tuple(a.shape)} @ {tuple(b.shape)}")
    acc = acc_dtype(a.dtype)
    out = torch.empty((m, n), device=a.device, dtype=out_dtype or a.dtype)
    stats = stats_split is not None
    part = torch.zeros((triton.cdiv(n, _min_block_n()) if stats else 1, 2, 3, m if stats else 1), device=a.device, dtype=acc)
    pro = prologue_a if prologue_a is not None else prologue_b
    if pro is not None:
        args = (pro.stats.to(acc).contiguous(), pro.gamma.to(acc).contiguous(), pro.beta.to(acc).contiguous(),
                act_vector(pro.slope, pro.scale, a, acc), pro.stats.shape[1], pro.split)
    else:
        dummy = a.new_zeros(4, dtype=acc)
        args = (dummy, dummy, dummy, dummy, 1, 0)
    stats_ptr, gamma, beta, acts, tokens, split = args
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(n, meta["BLOCK_N"]))  # noqa: E731
    if m > 0 and n > 0:
        _ln_gemm_kernel[grid](
            a, b, out, part, stats_ptr, gamma, beta, acts,
            m, n, k, *a.stride(), *b.stride(), tokens, split, stats_split if stats else n,
            PRO_A=prologue_a is not None, PRO_B=prologue_b is not None, STATS=stats,
            GELU=pro is not None and pro.gelu,
            ACC=tl_dtype(acc), DOT=dot_dtype(a.dtype), PRECISION=dot_precision(a.dtype),
        )
    if not stats:
        return out, None
    # the autotuner may pick a wider BLOCK_N than the smallest: tiles it did not write stay zero-count
    return out, part


def row_statistics(part: Tensor, eps: float) -> Tensor:
    """[4, M] (mean, rstd of segment 0, then of segment 1) from :func:`ln_gemm`'s partials, in the
    partials' dtype; a segment without columns gets segment 0's statistics."""
    p = part.double()
    count, mean_t, m2_t = p[:, :, 0], p[:, :, 1], p[:, :, 2]  # [tiles, 2, M]
    total = count.sum(0)
    mean = (count * mean_t).sum(0) / total.clamp_min(1)
    m2 = (m2_t + count * (mean_t - mean) ** 2).sum(0)
    rstd = torch.rsqrt(m2 / total.clamp_min(1) + eps)
    empty = total[1] == 0
    mean[1] = torch.where(empty, mean[0], mean[1])
    rstd[1] = torch.where(empty, rstd[0], rstd[1])
    return torch.stack([mean[0], rstd[0], mean[1], rstd[1]]).to(part.dtype)
