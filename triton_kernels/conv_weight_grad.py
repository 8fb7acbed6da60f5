"""Weight gradient of :func:`conv2d_implicit_gemm`'s convolution, with the same input prologue.

dw[t, c, o] = sum over output pixels m of  P(x)[pixel(m) + offset(t), c] * dy[m, o]

A GEMM per tap, reduced over the (long) pixel axis in splits whose partial results are summed after.
The prologue recomputes the normalised / activated input from the saved pre-norm tensor, so backward
never needs it stored; a second prologue on dy applies the next layer's dAct + dBN as it is loaded, so
that gradient is never stored either. Tiles that only hold weights a centre-only range makes structurally zero
(see :mod:`.conv_implicit_gemm`) are skipped.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .bn_tiles import GradPrologue, Prologue, grad_prologue_args, load_operand, prologue_args, prologue_kind
from .conv_pixels import output_pixels, tap_input_offsets
from .launch import acc_dtype, conv_output_size, dot_dtype, dot_precision, tl_dtype
from .tuning import gemm_configs, persistent_tuning, prune_by_width

# (BLOCK_M = pixels per step, BLOCK_C, BLOCK_O, warps, stages) tried on a GPU
_GPU_CONFIGS = [
    (64, 64, 64, 4, 3),
    (128, 64, 64, 8, 3),
    (64, 32, 32, 4, 4),
    (64, 128, 64, 8, 3),
    (32, 16, 16, 4, 4),
    (128, 32, 64, 4, 3),
]
_ROWS_PER_SPLIT = 4096  # pixels each program reduces over (a multiple of every BLOCK_M)


@triton.jit
def _tap_products(
    acc, x_ptr, dy_ptr, saved_ptr, tap, offs_c, c_mask, offs_o, o_mask, m_start, m_end, H, W, CIN, OH, OW, COUT,
    stride_x_n, stride_x_c, stride_x_h, stride_x_w, conv_stride, pad,
    scale_ptr, shift_ptr, act_lo, act_hi, pos, neg, g_scale_ptr, g_shift_ptr, g_coef_ptr, g_act_lo, g_act_hi, g_pos, g_neg,
    KW: tl.constexpr, PROLOGUE: tl.constexpr, DY_PROLOGUE: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    """acc [BLOCK_C, BLOCK_O] += sum over output pixels [m_start, m_end) of P(x)[pixel + tap]^T Q(dy)[pixel]:
    x [N, CIN, H, W] through its strides and its prologue P (a :class:`Prologue`: ``scale`` / ``shift`` /
    activation), dy [N*OH*OW, COUT] contiguous through Q (a :class:`GradPrologue` reading ``saved`` at dy's
    offsets), BLOCK_M pixels a step."""
    for m0 in range(m_start, m_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_mask = offs_m < m_end
        img, oh, ow = output_pixels(offs_m, OH, OW)
        rows, inside = tap_input_offsets(img, oh, ow, m_mask, tap, H, W, stride_x_n, stride_x_h, stride_x_w,
                                         conv_stride, pad, KW)  # fmt: skip
        a = load_operand(
            x_ptr, x_ptr, rows[:, None] + offs_c[None, :] * stride_x_c, inside[:, None] & c_mask[None, :],
            offs_c, c_mask, CIN, scale_ptr, shift_ptr, scale_ptr, act_lo, act_hi, pos, neg, PROLOGUE, ACC,
        )  # fmt: skip
        b = load_operand(
            dy_ptr, saved_ptr, offs_m[:, None].to(tl.int64) * COUT + offs_o[None, :], m_mask[:, None] & o_mask[None, :],
            offs_o, o_mask, COUT, g_scale_ptr, g_shift_ptr, g_coef_ptr, g_act_lo, g_act_hi, g_pos, g_neg, DY_PROLOGUE, ACC,
        )  # fmt: skip
        acc = tl.dot(tl.trans(a.to(DOT)), b.to(DOT), acc, input_precision=PRECISION)
    return acc


@triton.autotune(
    configs=gemm_configs("BLOCK_M", "BLOCK_O", "BLOCK_C", _GPU_CONFIGS),
    key=["CIN", "COUT", "KH", "KW", "PROLOGUE", "DY_PROLOGUE"],
    prune_configs_by={"early_config_prune": prune_by_width("COUT", "BLOCK_O", "CIN", "BLOCK_C")},
    **persistent_tuning(),
)
@triton.jit
def _conv_wgrad_kernel(
    x_ptr, dy_ptr, dw_ptr, scale_ptr, shift_ptr, saved_ptr, g_scale_ptr, g_shift_ptr, g_coef_ptr,
    N, H, W, CIN, OH, OW, COUT, stride_x_n, stride_x_c, stride_x_h, stride_x_w, conv_stride, pad,
    skip_lo, skip_hi, cen_lo, cen_hi, act_lo, act_hi, act_ptr, g_act_lo, g_act_hi, g_act_ptr, rows_per_split,
    KH: tl.constexpr, KW: tl.constexpr, PROLOGUE: tl.constexpr, DY_PROLOGUE: tl.constexpr, ACC: tl.constexpr,
    DOT: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_O: tl.constexpr,
):  # fmt: skip
    """One [BLOCK_C input channels, BLOCK_O output channels] tile of one tap of split ``program_id(2)``'s
    partial weight gradient dw [splits, KH*KW, CIN, COUT] (:func:`_tap_products` over that split's
    ``rows_per_split`` output pixels). A tile of weights that the centre-only ranges make structurally
    zero (input channels [skip_lo, skip_hi) or output channels [cen_lo, cen_hi) off the centre tap) is
    written as zeros without reading anything."""
    pid_tc, pid_o, pid_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    c_blocks = tl.cdiv(CIN, BLOCK_C)
    tap = pid_tc // c_blocks
    c_lo = (pid_tc % c_blocks) * BLOCK_C
    o_lo = pid_o * BLOCK_O
    offs_c = c_lo + tl.arange(0, BLOCK_C)
    c_mask = offs_c < CIN
    offs_o = o_lo + tl.arange(0, BLOCK_O)
    o_mask = offs_o < COUT
    is_centre = tap == (KH // 2) * KW + KW // 2
    skipped_in = (c_lo >= skip_lo) & (c_lo + BLOCK_C <= skip_hi)
    structurally_zero = skipped_in | ((o_lo >= cen_lo) & (o_lo + BLOCK_O <= cen_hi))

    acc = tl.zeros((BLOCK_C, BLOCK_O), dtype=ACC)
    if is_centre | (structurally_zero == 0):
        m_start = pid_s * rows_per_split
        acc = _tap_products(
            acc=acc, x_ptr=x_ptr, dy_ptr=dy_ptr, saved_ptr=saved_ptr, tap=tap, offs_c=offs_c, c_mask=c_mask,
            offs_o=offs_o, o_mask=o_mask, m_start=m_start, m_end=tl.minimum(m_start + rows_per_split, N * OH * OW),
            H=H, W=W, CIN=CIN, OH=OH, OW=OW, COUT=COUT,
            stride_x_n=stride_x_n, stride_x_c=stride_x_c, stride_x_h=stride_x_h, stride_x_w=stride_x_w,
            conv_stride=conv_stride, pad=pad,
            scale_ptr=scale_ptr, shift_ptr=shift_ptr, act_lo=act_lo, act_hi=act_hi,
            pos=tl.load(act_ptr), neg=tl.load(act_ptr + 1),
            g_scale_ptr=g_scale_ptr, g_shift_ptr=g_shift_ptr, g_coef_ptr=g_coef_ptr, g_act_lo=g_act_lo, g_act_hi=g_act_hi,
            g_pos=tl.load(g_act_ptr), g_neg=tl.load(g_act_ptr + 1),
            KW=KW, PROLOGUE=PROLOGUE, DY_PROLOGUE=DY_PROLOGUE, ACC=ACC, DOT=DOT, PRECISION=PRECISION,
            BLOCK_M=BLOCK_M,
        )  # fmt: skip

    dw_ptrs = dw_ptr + ((pid_s * KH * KW + tap) * CIN + offs_c[:, None]).to(tl.int64) * COUT + offs_o[None, :]
    tl.store(dw_ptrs, acc, mask=c_mask[:, None] & o_mask[None, :])


def conv2d_weight_grad(
    x: Tensor,
    dy: Tensor,
    kernel_size: int,
    stride: int = 1,
    padding: int = 0,
    *,
    prologue: Optional[Prologue] = None,
    dy_prologue: Optional[GradPrologue] = None,
    skip_range: tuple[int, int] = (0, 0),
    centre_range: tuple[int, int] = (0, 0),
) -> Tensor:
    """The packed weight gradient [k*k, CIN, COUT] (accumulation dtype) of the convolution of ``x``
    (any strides, ``prologue`` applied) whose output gradient is ``dy`` as [N*OH*OW, COUT] contiguous
    (``dy_prologue`` applied: dy is then the gradient after the next BN + activation)."""
    n, cin, h, w = x.shape
    oh, ow = conv_output_size(h, w, kernel_size, stride, padding)
    m, cout = dy.shape
    if m != n * oh * ow:
        raise ValueError(f"dy has {m} rows, the convolution has {n * oh * ow} output pixels")
    dy = dy.contiguous()
    acc = acc_dtype(x.dtype)
    taps = kernel_size * kernel_size
    splits = max(1, triton.cdiv(m, _ROWS_PER_SPLIT))
    dw = torch.empty((splits, taps, cin, cout), device=x.device, dtype=acc)
    if m == 0:
        return dw.zero_().sum(0)
    scale, shift, act_lo, act_hi, acts = prologue_args(prologue, x, acc)
    saved, g_scale, g_shift, g_coef, g_lo, g_hi, g_acts = grad_prologue_args(dy_prologue, dy, acc)
    grid = lambda meta: (taps * triton.cdiv(cin, meta["BLOCK_C"]), triton.cdiv(cout, meta["BLOCK_O"]), splits)
    _conv_wgrad_kernel[grid](
        x, dy, dw, scale, shift, saved, g_scale, g_shift, g_coef,
        n, h, w, cin, oh, ow, cout, *x.stride(), stride, padding,
        *skip_range, *centre_range, act_lo, act_hi, acts, g_lo, g_hi, g_acts, _ROWS_PER_SPLIT,
        KH=kernel_size, KW=kernel_size, PROLOGUE=prologue_kind(prologue), DY_PROLOGUE=prologue_kind(dy_prologue),
        ACC=tl_dtype(acc), DOT=dot_dtype(x.dtype), PRECISION=dot_precision(x.dtype),
    )  # fmt: skip
    return dw.sum(0) if splits > 1 else dw[0]
