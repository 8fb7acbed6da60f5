"""Where a convolution's output pixels read their input: the index arithmetic the implicit-GEMM forward
(:mod:`.conv_implicit_gemm`) and the weight gradient (:mod:`.conv_weight_grad`) share. Output pixels are
numbered m = (n * OH + oh) * OW + ow, the rows of the [N*OH*OW, C] (NHWC) outputs; kernel taps
t = r * KW + s, row r and column s of the kernel."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def output_pixels(offs_m, OH, OW):
    """(image, row, column) of the output pixels ``offs_m``; the image as int64 (it multiplies the
    batch stride, which can pass 2^31 elements)."""
    img = (offs_m // (OH * OW)).to(tl.int64)
    pix = offs_m % (OH * OW)
    return img, pix // OW, pix % OW


@triton.jit
def tap_input_offsets(
    img, oh, ow, m_mask, tap, H, W, stride_x_n, stride_x_h, stride_x_w, conv_stride, pad, KW: tl.constexpr
):
    """(the element offset in x of the input pixel each output pixel reads at kernel tap ``tap``, whether
    that pixel lies inside the image: outside it, zero padding is read)."""
    ih = oh * conv_stride - pad + tap // KW
    iw = ow * conv_stride - pad + tap % KW
    inside = m_mask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
    return img * stride_x_n + ih.to(tl.int64) * stride_x_h + iw.to(tl.int64) * stride_x_w, inside
