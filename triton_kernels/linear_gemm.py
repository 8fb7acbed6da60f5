"""The matrix products of PNNHLinear, with its layer-norm fusions.

out[i, j] = sum_r P_A(A)[i, r] * P_B(B)[r, j]

- A and B are read through their strides, so transposed views cost nothing;
- the prologues (:mod:`.ln_tiles`) run on an operand while it is loaded, so what they produce never
  exists in memory:
  - on A, the previous layer's layer norm + activation (:class:`LnPrologue`; A's rows are tokens), or
    the backward of the next one on an output gradient (:class:`LnGradPrologue`; A = dY, rows are
    tokens, or A = dY^T of a weight gradient, columns are tokens);
  - on B, layer norm + activation (B's rows are tokens: the input of a weight gradient).
  Each token has two column segments with their own statistics: [0, split) the coder (no activation)
  and [split, width) the learner (activation);
- the epilogue writes per-tile row statistics of ``out`` for the next layer norm, per segment: the
  moments of :mod:`.moments` (count, tile mean, scaled squared deviations: no overflow, no
  cancellation), which :func:`row_statistics` merges with Chan's formula.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import triton
import triton.language as tl
from torch import Tensor

from .launch import (
    acc_dtype,
    act_vector,
    as_acc,
    device_constants,
    dot_dtype,
    dot_precision,
    dummy,
    interpreting,
    inverse_sqrt,
    tl_dtype,
)
from .ln_tiles import LnGradPrologue, LnPrologue, affine_pointers, ln_act_tile, ln_grad_tile
from .moments import FIELD_COUNT, FIELDS, merge_moments, store_moments, tile_moments
from .tuning import gemm_configs, persistent_tuning, prune_by_width

_GPU_CONFIGS = [
    (128, 128, 32, 8, 3),
    (128, 64, 32, 4, 3),
    (64, 128, 32, 4, 3),
    (64, 64, 32, 4, 4),
    (128, 128, 64, 8, 3),
]


@triton.jit
def _segment_stats(part_ptr, acc, valid, seg_mask, offs_m, m_mask, M, ACC: tl.constexpr):
    """Store the moments (:mod:`.moments`) of each row of the tile over the columns in ``seg_mask``."""
    count, mean, m2_scaled, scale = tile_moments(acc, valid & seg_mask[None, :], 1, ACC)
    store_moments(part_ptr, M, offs_m, m_mask, count, mean, m2_scaled, scale)


@triton.jit
def _load_a(
    a_ptr, saved_ptr, offs_m, m_mask, offs_k, k_mask, stride_a_m, stride_a_k, stride_saved_m, stride_saved_k,
    stats_a, coef_a, T, ga_lo, ga_hi, ba_lo, ba_hi, split_a, pos, neg,
    PRO_A: tl.constexpr, A_TOKENS_ALONG_K: tl.constexpr, GELU: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    """A's [BLOCK_M, BLOCK_K] tile through its prologue (PRO_A): none; 1, layer norm + activation (A's rows
    are tokens); 2, A is an output gradient: dAct + dLN against the saved pre-norm tensor (read at A's
    positions through its own strides), its tokens along M, or along K for dY^T of a weight gradient."""
    rows_m = offs_m[:, None].to(tl.int64)
    cols_k = offs_k[None, :].to(tl.int64)
    a_mask = m_mask[:, None] & k_mask[None, :]
    a = tl.load(a_ptr + rows_m * stride_a_m + cols_k * stride_a_k, mask=a_mask, other=0.0)
    if PRO_A == 1:
        a = ln_act_tile(a, offs_m[:, None], m_mask[:, None], offs_k[None, :], k_mask[None, :], stats_a, T,
                        ga_lo, ga_hi, ba_lo, ba_hi, split_a, pos, neg, GELU, ACC)  # fmt: skip
    elif PRO_A == 2:
        u = tl.load(saved_ptr + rows_m * stride_saved_m + cols_k * stride_saved_k, mask=a_mask, other=0.0)
        if A_TOKENS_ALONG_K:
            a = ln_grad_tile(a, u, offs_k[None, :], k_mask[None, :], offs_m[:, None], m_mask[:, None], stats_a,
                             coef_a, T, ga_lo, ga_hi, ba_lo, ba_hi, split_a, pos, neg, GELU, ACC)  # fmt: skip
        else:
            a = ln_grad_tile(a, u, offs_m[:, None], m_mask[:, None], offs_k[None, :], k_mask[None, :], stats_a,
                             coef_a, T, ga_lo, ga_hi, ba_lo, ba_hi, split_a, pos, neg, GELU, ACC)  # fmt: skip
    return a


@triton.jit
def _load_b(
    b_ptr, offs_k, k_mask, offs_n, n_mask, stride_b_k, stride_b_n,
    stats_b, T, gb_lo, gb_hi, bb_lo, bb_hi, split_b, pos, neg,
    PRO_B: tl.constexpr, GELU: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    """B's [BLOCK_K, BLOCK_N] tile, with PRO_B through layer norm + activation (B's rows are tokens)."""
    b_offs = offs_k[:, None].to(tl.int64) * stride_b_k + offs_n[None, :] * stride_b_n
    b = tl.load(b_ptr + b_offs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
    if PRO_B:
        b = ln_act_tile(b, offs_k[:, None], k_mask[:, None], offs_n[None, :], n_mask[None, :], stats_b, T,
                        gb_lo, gb_hi, bb_lo, bb_hi, split_b, pos, neg, GELU, ACC)  # fmt: skip
    return b


@triton.jit
def _store_row_partials(
    part_ptr, acc, valid, offs_m, m_mask, offs_n, n_mask, M, stats_split, part_tiles,
    ACC: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    """The statistics epilogue: the moments of each row of the tile over the columns of segment 0
    [0, stats_split) and segment 1 [stats_split, N), into tile ``program_id(1)`` of ``part`` [tiles,
    2 segments, FIELDS, M]. The partials are sized for the narrowest BLOCK_N: the last column of programs
    zeroes the tiles past this launch's (their counts must read 0), which saves a memset launch."""
    pid_n = tl.program_id(1)
    tile = part_ptr + pid_n.to(tl.int64) * 2 * FIELDS * M
    _segment_stats(tile, acc, valid, n_mask & (offs_n < stats_split), offs_m, m_mask, M, ACC)
    _segment_stats(tile + FIELDS * M, acc, valid, n_mask & (offs_n >= stats_split), offs_m, m_mask, M, ACC)
    if pid_n == tl.num_programs(1) - 1:
        zero = tl.zeros((BLOCK_M,), dtype=ACC)
        tile_stride = tl.full((), 2 * FIELDS, tl.int64) * M
        for t in range(tl.num_programs(1), part_tiles):
            tail = part_ptr + t * tile_stride
            store_moments(tail, M, offs_m, m_mask, zero, zero, zero, zero)
            store_moments(tail + FIELDS * M, M, offs_m, m_mask, zero, zero, zero, zero)


@triton.autotune(
    configs=gemm_configs("BLOCK_M", "BLOCK_N", "BLOCK_K", _GPU_CONFIGS),
    key=["N", "K", "PRO_A", "A_TOKENS_ALONG_K", "PRO_B", "STATS", "GELU"],
    prune_configs_by={"early_config_prune": prune_by_width("N", "BLOCK_N", "K", "BLOCK_K")},
    **persistent_tuning(),
)
@triton.jit
def _ln_gemm_kernel(
    a_ptr, b_ptr, out_ptr, part_ptr, saved_ptr,
    stats_a, coef_a, ga_lo, ga_hi, ba_lo, ba_hi, split_a, stats_b, gb_lo, gb_hi, bb_lo, bb_hi, split_b, act_ptr,
    M, N, K, stride_a_m, stride_a_k, stride_b_k, stride_b_n, stride_out_m, stride_out_n, stride_saved_m,
    stride_saved_k, T, stats_split, part_tiles,
    PRO_A: tl.constexpr, A_TOKENS_ALONG_K: tl.constexpr, PRO_B: tl.constexpr, STATS: tl.constexpr,
    GELU: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """One [BLOCK_M, BLOCK_N] tile of out [M, N] = P_A(A) @ P_B(B): A [M, K], B [K, N] and out through
    their strides; P_A and P_B as :func:`_load_a` and :func:`_load_b` say (``stats_*``: [4, T] token
    statistics; ``g*_lo/hi``, ``b*_lo/hi``: gamma and beta of the two segments split at ``split_*``;
    ``coef_a``: the gradient prologue's coefficients). With STATS the epilogue writes the tile's row
    moments (:func:`_store_row_partials`)."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    pos, neg = tl.load(act_ptr), tl.load(act_ptr + 1)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        a = _load_a(
            a_ptr=a_ptr, saved_ptr=saved_ptr, offs_m=offs_m, m_mask=m_mask, offs_k=offs_k, k_mask=k_mask,
            stride_a_m=stride_a_m, stride_a_k=stride_a_k, stride_saved_m=stride_saved_m, stride_saved_k=stride_saved_k,
            stats_a=stats_a, coef_a=coef_a, T=T, ga_lo=ga_lo, ga_hi=ga_hi, ba_lo=ba_lo, ba_hi=ba_hi, split_a=split_a,
            pos=pos, neg=neg, PRO_A=PRO_A, A_TOKENS_ALONG_K=A_TOKENS_ALONG_K, GELU=GELU, ACC=ACC,
        )  # fmt: skip
        b = _load_b(
            b_ptr=b_ptr, offs_k=offs_k, k_mask=k_mask, offs_n=offs_n, n_mask=n_mask, stride_b_k=stride_b_k,
            stride_b_n=stride_b_n, stats_b=stats_b, T=T, gb_lo=gb_lo, gb_hi=gb_hi, bb_lo=bb_lo, bb_hi=bb_hi,
            split_b=split_b, pos=pos, neg=neg, PRO_B=PRO_B, GELU=GELU, ACC=ACC,
        )  # fmt: skip
        acc = tl.dot(a.to(DOT), b.to(DOT), acc, input_precision=PRECISION)

    valid = m_mask[:, None] & n_mask[None, :]
    out_offs = offs_m[:, None].to(tl.int64) * stride_out_m + offs_n[None, :] * stride_out_n
    tl.store(out_ptr + out_offs, acc.to(out_ptr.dtype.element_ty), mask=valid)
    if STATS:
        _store_row_partials(part_ptr, acc, valid, offs_m, m_mask, offs_n, n_mask, M, stats_split, part_tiles, ACC,
                            BLOCK_M)  # fmt: skip


def _partials(tiles: int, m: int, like: Tensor, acc: torch.dtype) -> Tensor:
    """Uninitialised: the kernel writes every tile (a test fills it with NaN to check that)."""
    return torch.empty((tiles, 2, FIELD_COUNT, m), device=like.device, dtype=acc)


def _min_block_n() -> int:
    return min(c.kwargs["BLOCK_N"] for c in _ln_gemm_kernel.configs)


def _norm_args(p: LnPrologue, acc: torch.dtype) -> tuple:
    """(stats, gamma lo, gamma hi, beta lo, beta hi, split) kernel arguments of a layer norm."""
    return (as_acc(p.stats, acc), *affine_pointers(p.gamma, p.beta, p.split, acc), p.split)


def _check_prologue(p, operand: Tensor, name: str, tokens_axis: int) -> int:
    """The token count of a prologue on ``operand`` (checked against its vectors)."""
    if isinstance(p, LnGradPrologue) and p.saved.shape != operand.shape:
        raise ValueError(
            f"{name}: the saved tensor {tuple(p.saved.shape)} must match the gradient {tuple(operand.shape)}"
            " (a transposed gradient takes the prologue's .t())"
        )
    tokens = operand.shape[tokens_axis]
    shapes = [p.norm.stats, p.coef] if isinstance(p, LnGradPrologue) else [p.stats]
    if any(t.shape != (4, tokens) for t in shapes):
        raise ValueError(f"{name}: per-token vectors must be [4, {tokens}], got {[tuple(t.shape) for t in shapes]}")
    return tokens


def ln_gemm(
    a: Tensor,
    b: Tensor,
    *,
    prologue_a: Optional[Union[LnPrologue, LnGradPrologue]] = None,
    prologue_b: Optional[LnPrologue] = None,
    stats_split: Optional[int] = None,
    out_dtype: Optional[torch.dtype] = None,
    out: Optional[Tensor] = None,
) -> tuple[Tensor, Optional[Tensor]]:
    """``P_A(a) @ P_B(b)`` ([M, K] @ [K, N], any strides) as a new contiguous [M, N] in ``out_dtype``
    (default a's), or written into ``out`` (any strides: a transposed view, say); with ``stats_split``
    also the epilogue's row-statistics moments [tiles, 2, FIELDS, M] of the segments [0, stats_split) and
    [stats_split, N) (see :func:`row_statistics`). When both prologues are given they share the
    activation and the token count."""
    m, k = a.shape
    k2, n = b.shape
    if k != k2:
        raise ValueError(f"inner sizes differ: {tuple(a.shape)} @ {tuple(b.shape)}")
    if isinstance(prologue_b, LnGradPrologue):
        raise ValueError("the gradient prologue goes on A (dY or dY^T)")
    pros = [p.norm if isinstance(p, LnGradPrologue) else p for p in (prologue_a, prologue_b) if p is not None]
    if len({(p.gelu, p.slope, p.scale) for p in pros}) > 1:
        raise ValueError("both prologues must use the same activation")
    acc = acc_dtype(a.dtype)
    a_grad = isinstance(prologue_a, LnGradPrologue)
    a_tokens_axis = prologue_a.tokens_axis if a_grad else 0
    tokens = [_check_prologue(prologue_a, a, "prologue_a", a_tokens_axis)] if prologue_a is not None else []
    if prologue_b is not None:
        tokens.append(_check_prologue(prologue_b, b, "prologue_b", 0))
    if len(set(tokens)) > 1:
        raise ValueError(f"the prologues disagree on the token count: {tokens}")
    unused = dummy(a, acc)
    none_args = (unused, unused, unused, unused, unused, 0)
    a_args = _norm_args(pros[0], acc) if prologue_a is not None else none_args
    b_args = _norm_args(pros[-1], acc) if prologue_b is not None else none_args
    saved = prologue_a.saved if a_grad else a
    coef = as_acc(prologue_a.coef, acc) if a_grad else unused
    acts = act_vector(pros[0].slope, pros[0].scale, a, acc) if pros else unused
    if out is None:
        out = torch.empty((m, n), device=a.device, dtype=out_dtype or a.dtype)
    elif out.shape != (m, n):
        raise ValueError(f"out {tuple(out.shape)} is not [{m}, {n}]")
    stats = stats_split is not None
    part = _partials(triton.cdiv(n, _min_block_n()), m, a, acc) if stats else unused
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(n, meta["BLOCK_N"]))
    if m > 0 and n > 0:
        stats_a, ga_lo, ga_hi, ba_lo, ba_hi, split_a = a_args
        _ln_gemm_kernel[grid](
            a, b, out, part, saved, stats_a, coef, ga_lo, ga_hi, ba_lo, ba_hi, split_a, *b_args, acts,
            m, n, k, *a.stride(), *b.stride(), *out.stride(), *saved.stride(),
            tokens[0] if tokens else 1, stats_split if stats else n, part.shape[0] if stats else 0,
            PRO_A=0 if prologue_a is None else (2 if a_grad else 1), A_TOKENS_ALONG_K=a_tokens_axis == 1,
            PRO_B=prologue_b is not None, STATS=stats, GELU=bool(pros) and pros[0].gelu, ACC=tl_dtype(acc),
            DOT=dot_dtype(a.dtype), PRECISION=dot_precision(a.dtype),
        )  # fmt: skip
    if not stats:
        return out, None
    return out, part


@triton.jit
def _rstd(m2, n, eps, F64: tl.constexpr):
    """1 / sqrt(variance + eps) from the merged squared deviations ``m2`` of ``n`` values."""
    return inverse_sqrt(m2 / tl.maximum(n, 1.0) + eps, F64)


@triton.jit
def _row_statistics_kernel(
    part_ptr, out_ptr, tiles, M, const_ptr, F64: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK: tl.constexpr
):
    """out [4, M] (mean, rstd of segment 0, then of segment 1) of BLOCK rows, merging ``tiles`` tiles of
    :func:`ln_gemm`'s partials [tiles, 2, FIELDS, M]; eps is ``const_ptr[0]``."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < M
    eps = tl.load(const_ptr)
    tile_stride = 2 * FIELDS * M
    n0, mean0, m2_0 = merge_moments(part_ptr, tiles, tile_stride, M, offs, mask, BLOCK_T, BLOCK)
    n1, mean1, m2_1 = merge_moments(part_ptr + FIELDS * M, tiles, tile_stride, M, offs, mask, BLOCK_T, BLOCK)
    rstd0 = _rstd(m2_0, n0, eps, F64)
    empty = n1 == 0  # a layer with one norm: its second segment repeats the first
    mean1 = tl.where(empty, mean0, mean1)
    rstd1 = tl.where(empty, rstd0, _rstd(m2_1, n1, eps, F64))
    dt = out_ptr.dtype.element_ty
    tl.store(out_ptr + offs, mean0.to(dt), mask=mask)
    tl.store(out_ptr + M + offs, rstd0.to(dt), mask=mask)
    tl.store(out_ptr + 2 * M + offs, mean1.to(dt), mask=mask)
    tl.store(out_ptr + 3 * M + offs, rstd1.to(dt), mask=mask)


def row_statistics(part: Tensor, eps: float) -> Tensor:
    """[4, M] (mean, rstd of segment 0, then of segment 1) from :func:`ln_gemm`'s partials, in the
    partials' dtype, one launch; a segment without columns gets segment 0's statistics."""
    if part.dim() != 4 or part.shape[1:3] != (2, FIELD_COUNT):
        raise ValueError(f"partials {tuple(part.shape)} are not [tiles, 2, {FIELD_COUNT}, M]")
    m = part.shape[3]
    out = torch.empty((4, m), device=part.device, dtype=part.dtype)
    block = 16 if interpreting() else 256
    if m > 0:
        _row_statistics_kernel[(triton.cdiv(m, block),)](
            part.contiguous(),
            out,
            part.shape[0],
            m,
            device_constants((eps,), part.device, torch.float64),
            F64=part.dtype == torch.float64,
            BLOCK_T=4 if interpreting() else 8,
            BLOCK=block,
        )
    return out
