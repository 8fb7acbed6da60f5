"""Convolution as an implicit GEMM, with the PNNH block's fusions.

out[m, o] = sum over taps t and input channels c of  P(x)[pixel(m) + offset(t), c] * w[t, c, o]

- rows m are output pixels (n, oh, ow); the output is written as [rows, out channels] (NHWC);
- the reduction runs as (tap, channel block) steps in one pipelined loop per channel range, not a loop
  per tap: the CIFAR stages' 16-64 channels make one to four blocks a tap;
- the input is read through its four strides, so NCHW, channels_last and sliced tensors all work;
- P is an optional prologue applied while loading: BN-apply + activation of the previous layer
  (:class:`Prologue`), so the normalised / activated tensor never exists in memory; or, when x is an
  output gradient, the backward of the next layer's BN + activation (:class:`GradPrologue`), so the
  gradient of its pre-norm input is never stored either;
- the epilogue writes per-tile moments of every output channel (the batch statistics, in a form that
  cannot overflow, see :mod:`.moments`; reduced without atomics, hence deterministic);
- centre-only channel ranges: input channels [skip_lo, skip_hi) are read at the centre tap only, and
  output tiles inside [cen_lo, cen_hi) compute the centre tap only. That is how a 1x1 coder shares one
  GEMM with a 3x3 learner without doing nine times the coder's work.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Union

import torch
import triton
import triton.language as tl
from torch import Tensor

from .bn_tiles import GradPrologue, Prologue, load_operand, operand_args, prologue_kind
from .conv_pixels import output_pixels, tap_input_offsets
from .launch import acc_dtype, conv_output_size, dot_dtype, dot_precision, dummy, tl_dtype
from .moments import FIELD_COUNT, FIELDS, moments_to_sums, store_moments, tile_moments
from .tuning import gemm_configs, persistent_tuning, prune_by_width

# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages) tried on a GPU
_GPU_CONFIGS = [
    (128, 64, 32, 4, 3),
    (128, 128, 32, 8, 3),
    (64, 64, 32, 4, 4),
    (128, 32, 16, 4, 4),
    (64, 32, 16, 4, 4),
    (128, 128, 64, 8, 3),
    (256, 64, 32, 8, 3),
    (128, 64, 64, 4, 3),
]


@triton.jit
def _accumulate_taps(
    acc, x_ptr, saved_ptr, w_ptr, img, oh, ow, m_mask, offs_n, n_mask, H, W, CIN,
    stride_x_n, stride_x_c, stride_x_h, stride_x_w, stride_w_tap, stride_w_in, stride_w_out, conv_stride, pad,
    tap_base, taps, skip_at, c_start, c_end,
    scale_ptr, shift_ptr, coef_ptr, act_lo, act_hi, pos, neg,
    KW: tl.constexpr, PROLOGUE: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_K: tl.constexpr,
):  # fmt: skip
    """acc [BLOCK_M, BLOCK_N] += the products of x (through its prologue) and w over taps ``tap_base + t``
    (t < ``taps``; from t = ``skip_at`` on, one tap further, past the centre) and input channels
    [c_start, c_end), as one loop of (tap, channel block) steps. One loop spans many taps: with 16-64
    channels a tap holds one to four blocks, too few for the software pipeline to overlap loads and
    products. (Taps in runtime loops: unrolled, the GradPrologue specialisation took a minute to compile.)

    x: [N, CIN, H, W] read through its strides; w: packed [taps, CIN, COUT] read through its strides
    (a transposed weight is the same memory read with other strides)."""
    blocks = tl.cdiv(c_end - c_start, BLOCK_K)
    for step in range(taps * blocks):
        t = step // blocks
        tap = tap_base + t + tl.where(t >= skip_at, 1, 0)
        rows, inside = tap_input_offsets(img, oh, ow, m_mask, tap, H, W, stride_x_n, stride_x_h, stride_x_w,
                                         conv_stride, pad, KW)  # fmt: skip
        offs_k = c_start + (step - t * blocks) * BLOCK_K + tl.arange(0, BLOCK_K)
        k_mask = offs_k < c_end
        a = load_operand(
            x_ptr, saved_ptr, rows[:, None] + offs_k[None, :] * stride_x_c, inside[:, None] & k_mask[None, :],
            offs_k, k_mask, CIN, scale_ptr, shift_ptr, coef_ptr, act_lo, act_hi, pos, neg, PROLOGUE, ACC,
        )  # fmt: skip
        w_offs = tap * stride_w_tap + offs_k[:, None] * stride_w_in + offs_n[None, :] * stride_w_out
        b = tl.load(w_ptr + w_offs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        acc = tl.dot(a.to(DOT), b.to(DOT), acc, input_precision=PRECISION)
    return acc


@triton.jit
def _store_partials(part_ptr, acc, out_mask, offs_n, n_mask, COUT, part_rows, ACC: tl.constexpr, BLOCK_N: tl.constexpr):
    """The statistics epilogue: this tile's moments of every output channel into row ``program_id(0)`` of
    ``part`` [part_rows, FIELDS, COUT] (see :mod:`.moments`). The partials are sized for the smallest
    BLOCK_M; rows past this launch's tiles must read as zero, and zeroing them here saves a memset launch
    (a few rows per program at most)."""
    pid_m = tl.program_id(0)
    row_stride = tl.full((), FIELDS, tl.int64) * COUT
    count, mean, m2_scaled, scale = tile_moments(acc, out_mask, 0, ACC)
    store_moments(part_ptr + pid_m.to(tl.int64) * row_stride, COUT, offs_n, n_mask, count, mean, m2_scaled, scale)
    zero = tl.zeros((BLOCK_N,), dtype=ACC)
    for r in range(pid_m + tl.num_programs(0), part_rows, tl.num_programs(0)):
        store_moments(part_ptr + r * row_stride, COUT, offs_n, n_mask, zero, zero, zero, zero)


@triton.autotune(
    configs=gemm_configs("BLOCK_M", "BLOCK_N", "BLOCK_K", _GPU_CONFIGS),
    key=["CIN", "COUT", "KH", "KW", "PROLOGUE", "STATS"],
    prune_configs_by={"early_config_prune": prune_by_width("COUT", "BLOCK_N", "CIN", "BLOCK_K")},
    **persistent_tuning(),
)
@triton.jit
def _conv_fwd_kernel(
    x_ptr, saved_ptr, w_ptr, out_ptr, part_ptr, scale_ptr, shift_ptr, coef_ptr,
    N, H, W, CIN, OH, OW, COUT,
    stride_x_n, stride_x_c, stride_x_h, stride_x_w, w_offset, stride_w_tap, stride_w_in, stride_w_out,
    conv_stride, pad, skip_lo, skip_hi, cen_lo, cen_hi, act_lo, act_hi, act_ptr, part_rows,
    KH: tl.constexpr, KW: tl.constexpr, PROLOGUE: tl.constexpr, STATS: tl.constexpr, ACC: tl.constexpr,
    DOT: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """One [BLOCK_M output pixels, BLOCK_N output channels] tile of out [N*OH*OW, COUT] (rows, NHWC) =
    conv(P(x), w): x [N, CIN, H, W] through its strides, P its prologue (PROLOGUE: none, :class:`Prologue`
    with ``scale`` / ``shift`` / ``act_ptr``, or :class:`GradPrologue` also reading ``saved`` at x's offsets
    and ``coef``); w packed [KH*KW, CIN, COUT] at ``w_offset``, read through its strides. Input channels
    [skip_lo, skip_hi) are read at the centre tap only; a tile inside output channels [cen_lo, cen_hi)
    computes the centre tap only. With STATS the tile's moments go to ``part`` (:func:`_store_partials`)."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < N * OH * OW
    img, oh, ow = output_pixels(offs_m, OH, OW)
    n_lo = tl.program_id(1) * BLOCK_N
    offs_n = n_lo + tl.arange(0, BLOCK_N)
    n_mask = offs_n < COUT
    centre = (KH // 2) * KW + KW // 2
    others = tl.where((n_lo >= cen_lo) & (n_lo + BLOCK_N <= cen_hi), 0, KH * KW - 1)  # a centre-only tile: none

    pos, neg = tl.load(act_ptr), tl.load(act_ptr + 1)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    for phase in tl.static_range(3):  # the centre tap over every channel, the others below and above the skip
        if phase == 0:
            tap_base, taps, skip_at, c_start, c_end = centre, 1, 1, 0, CIN
        elif phase == 1:
            tap_base, taps, skip_at, c_start, c_end = 0, others, centre, 0, skip_lo
        else:
            tap_base, taps, skip_at, c_start, c_end = 0, others, centre, skip_hi, CIN
        acc = _accumulate_taps(
            acc=acc, x_ptr=x_ptr, saved_ptr=saved_ptr, w_ptr=w_ptr + w_offset, img=img, oh=oh, ow=ow,
            m_mask=m_mask, offs_n=offs_n, n_mask=n_mask, H=H, W=W, CIN=CIN,
            stride_x_n=stride_x_n, stride_x_c=stride_x_c, stride_x_h=stride_x_h, stride_x_w=stride_x_w,
            stride_w_tap=stride_w_tap, stride_w_in=stride_w_in, stride_w_out=stride_w_out,
            conv_stride=conv_stride, pad=pad,
            tap_base=tap_base, taps=taps, skip_at=skip_at, c_start=c_start, c_end=c_end,
            scale_ptr=scale_ptr, shift_ptr=shift_ptr, coef_ptr=coef_ptr, act_lo=act_lo, act_hi=act_hi,
            pos=pos, neg=neg,
            KW=KW, PROLOGUE=PROLOGUE, ACC=ACC, DOT=DOT, PRECISION=PRECISION, BLOCK_K=BLOCK_K,
        )  # fmt: skip

    out_mask = m_mask[:, None] & n_mask[None, :]
    out_ptrs = out_ptr + offs_m[:, None].to(tl.int64) * COUT + offs_n[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)
    if STATS:
        _store_partials(part_ptr, acc, out_mask, offs_n, n_mask, COUT, part_rows, ACC, BLOCK_N)


def _partials(rows: int, cout: int, like: Tensor, acc: torch.dtype) -> Tensor:
    """Uninitialised: the kernel writes every row (a test fills it with NaN to check that)."""
    return torch.empty((rows, FIELD_COUNT, cout), device=like.device, dtype=acc)


def _min_block_m() -> int:
    return min(c.kwargs["BLOCK_M"] for c in _conv_fwd_kernel.configs)


class _WeightLayout(NamedTuple):
    """How the kernel reads a packed weight: (offset, tap, in, out) strides in elements."""

    offset: int
    stride_tap: int
    stride_in: int
    stride_out: int


def _weight_layout(
    w_packed: Tensor, cin: int, kernel_size: int, stride: int, padding: int, transposed: bool
) -> tuple[_WeightLayout, int]:
    """(the read of ``w_packed``, COUT) for :func:`conv2d_implicit_gemm`, checking the weight fits."""
    if not w_packed.is_contiguous():
        raise ValueError("the packed weight must be contiguous")
    taps, wcin, cout = w_packed.shape
    layout = _WeightLayout(0, wcin * cout, cout, 1)
    if transposed:
        if stride != 1 or 2 * padding != kernel_size - 1:
            raise ValueError("a transposed weight serves the input gradient of a stride-1 'same' convolution only")
        taps, cout, wcin = w_packed.shape  # read with the taps flipped and the channel axes swapped
        layout = _WeightLayout((taps - 1) * cout * wcin, -cout * wcin, 1, wcin)
    if taps != kernel_size * kernel_size or wcin != cin:
        raise ValueError(f"packed weight {tuple(w_packed.shape)} does not fit {cin} channels and kernel {kernel_size}")
    return layout, cout


def conv2d_implicit_gemm(
    x: Tensor,
    w_packed: Tensor,
    kernel_size: int,
    stride: int = 1,
    padding: int = 0,
    *,
    prologue: Union[Prologue, GradPrologue, None] = None,
    skip_range: tuple[int, int] = (0, 0),
    centre_range: tuple[int, int] = (0, 0),
    transposed_weight: bool = False,
    stats: bool = False,
    reduce_stats: bool = True,
    out_dtype: Optional[torch.dtype] = None,
) -> tuple[Tensor, Optional[Tensor]]:
    """``out`` as [N*OH*OW, COUT] and, with ``stats``, the per-channel (sum, sum of squares) [2, COUT]
    reduced over tiles in float64, or with ``reduce_stats=False`` the per-tile moments [tiles, FIELDS, COUT]
    in the accumulation dtype (float64 for float64 data, else float32) for :func:`bn_finalize`.

    x: [N, CIN, H, W] with any strides. w_packed: [k*k, CIN, COUT] contiguous (see :func:`pack_weight`);
    with ``transposed_weight`` it is the packed [k*k, COUT, CIN] weight of the convolution whose input
    gradient this one is (stride 1, 'same' padding), read with its taps flipped and its channel axes
    swapped in place (the weights the forward packed serve the backward, no copy).
    ``prologue``: what x goes through as it is loaded: a :class:`Prologue` (the previous layer's BN +
    activation) or a :class:`GradPrologue` (x is an output gradient; dAct + dBN of the layer after).
    """
    n, cin, h, w = x.shape
    w_layout, cout = _weight_layout(w_packed, cin, kernel_size, stride, padding, transposed_weight)
    oh, ow = conv_output_size(h, w, kernel_size, stride, padding)
    m = n * oh * ow
    acc = acc_dtype(x.dtype)
    out = torch.empty((m, cout), device=x.device, dtype=out_dtype or x.dtype)
    rows = triton.cdiv(m, _min_block_m()) if stats else 1
    part = _partials(rows, cout, x, acc) if stats else dummy(x, acc)
    saved, scale, shift, coef, act_lo, act_hi, acts = operand_args(prologue, x, acc)
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(cout, meta["BLOCK_N"]))
    if m > 0 and cout > 0:
        _conv_fwd_kernel[grid](
            x, saved, w_packed, out, part, scale, shift, coef,
            n, h, w, cin, oh, ow, cout,
            *x.stride(), *w_layout,
            stride, padding, *skip_range, *centre_range, act_lo, act_hi, acts, rows,
            KH=kernel_size, KW=kernel_size, PROLOGUE=prologue_kind(prologue), STATS=stats, ACC=tl_dtype(acc),
            DOT=dot_dtype(x.dtype), PRECISION=dot_precision(x.dtype),
        )  # fmt: skip
    if not stats:
        return out, None
    return out, (moments_to_sums(part) if reduce_stats else part)


def pack_weight(weight: Tensor) -> Tensor:
    """[out, in, k, k] (torch's conv layout) -> [k*k, in, out], the layout the kernels read."""
    o, i, kh, kw = weight.shape
    return weight.permute(2, 3, 1, 0).reshape(kh * kw, i, o).contiguous()


def unpack_weight(packed: Tensor, kernel_size: int) -> Tensor:
    """Inverse of :func:`pack_weight`."""
    _taps, i, o = packed.shape
    return packed.reshape(kernel_size, kernel_size, i, o).permute(3, 2, 0, 1)
