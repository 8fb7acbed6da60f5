"""The PNNH conv block on the Triton kernels (``pnnh::conv_block_triton`` and its backward), same
signatures and autograd wiring as :mod:`.fused_conv_op`.

Every step is a Triton launch; no torch arithmetic runs between them (on a GPU the block is bound by
launching work, benchmarks/results/NOTES.md). Forward, six launches:
0. one gather packs both layers' weights (:mod:`~pnnh_kernels.triton_kernels.block_weights`);
1. layer 1: one implicit-GEMM conv reads x once through ``[W_e; W_1]`` (a 1x1 coder beside a 3x3
   learner computes its centre tap only) and reduces both halves' batch statistics in its epilogue;
2. layer 2: one implicit-GEMM conv over the *pre-norm* layer-1 output ``z`` whose prologue applies
   BN_c (coder channels) and BN_1 + activation (learner channels) while loading, and whose weight is
   ``[g * W_d, W_2]`` along input channels: the coder and learner GEMMs accumulate into one tile, the
   signed copies never exist; its epilogue reduces BN_2's statistics;
3. one BN_2 + activation pass;
and after each convolution one small launch turns its statistics partials (or, in eval, the running
statistics) into the layer's mean / invstd / var and the next prologue's scale / shift.
Backward, per layer: one pass reduces dAct + dBN's sums (which are also the BN parameters' gradients)
and one small launch turns them into per-channel coefficients; the apply of dAct + dBN then runs inside
the loads of the layer's input-gradient and weight-gradient convolutions (:class:`GradPrologue`), so
the gradients of the pre-norm ``u`` and ``z`` are never stored. Layer 2's weight gradient also
recomputes BN_1 + activation from ``z`` in its other operand's prologue; the input-gradient
convolutions read the forward's packed weights flipped and transposed in place, and one launch
unpacks the weight gradients into the parameters' shapes (nine launches in all).
Saved: x, ``z`` and ``u`` (pre-norm, [pixels, channels]), the packed weights and the statistics;
nothing normalised.

Intermediates are [N*H*W, C] (NHWC); y comes back in the input's memory format (written so by the last
pass), dx as a channels_last NCHW tensor.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .fused_conv_op import param_dtype, register_block_autograd
from .rows_layout import RowsLayout

from pnnh_kernels.triton_kernels import (  # noqa: E402  (the package needs triton: imported by the backend lazily)
    GradPrologue,
    Prologue,
    bn_act_backward_sums,
    bn_act_forward,
    conv2d_implicit_gemm,
    conv2d_weight_grad,
)
from pnnh_kernels.triton_kernels.block_weights import (  # noqa: E402
    block_shape,
    pack_block_weights,
    packed_views,
    unpack_block_weight_grads,
)
from pnnh_kernels.triton_kernels.bn_stats import bn_backward_finalize, bn_finalize  # noqa: E402


# --------------------------------------------------------------------------- the block's geometry


class _Geometry(RowsLayout):
    """Widths, the shared kernel size K, and the channel ranges whose weights are centre-only."""

    def __init__(self, x: Tensor, enc: Tensor, learn1: Tensor, learn2: Tensor) -> None:
        super().__init__(x)
        self.cin = x.shape[1]
        self.cc, self.hid, self.out = enc.shape[0], learn1.shape[0], learn2.shape[0]
        self.c1 = self.cc + self.hid
        self.kc, self.k = enc.shape[-1], learn1.shape[-1]
        self.K = max(self.kc, self.k)
        self.pad = self.K // 2
        if self.kc < self.K:
            self.narrow = (0, self.cc)  # the coder's channels of z: 1x1 beside a k x k learner
        elif self.k < self.K:
            self.narrow = (self.cc, self.c1)
        else:
            self.narrow = (0, 0)


def _output_format(x: Tensor) -> torch.memory_format:
    """The block's output keeps a channels_last input's format; anything else comes out contiguous (NCHW)."""
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def _layer1_prologue(g: _Geometry, bn_scale: Tensor, bn_shift: Tensor, slope: float, scale: float) -> Prologue:
    """BN_c on the coder channels of z, BN_1 + activation on the learner channels (``bn_scale`` /
    ``bn_shift``: per channel of both halves, gamma * invstd and beta - mean * gamma * invstd)."""
    return Prologue(bn_scale, bn_shift, g.cc, g.c1, slope, scale)


# --------------------------------------------------------------------------- forward op


def _conv_block_triton(
    x: Tensor, enc: Tensor, learn1: Tensor, learn2: Tensor, dec: Optional[Tensor],
    gc: Tensor, bc: Tensor, g1: Tensor, b1: Tensor, g2: Tensor, b2: Tensor,
    running_mean: Optional[Tensor], running_var: Optional[Tensor],
    use_batch: bool, eps: float, slope: float, scale: float, gain: float, final_act: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns (y, z, packed, u, mean, invstd, batch_var): z = layer 1's pre-norm [pixels, C1], u =
    layer 2's pre-norm [pixels, Cout], packed = both layers' packed weights (saved for backward);
    statistics cover [coder, learner, out] channels."""
    g = _Geometry(x, enc, learn1, learn2)
    c1 = g.c1
    packed, w1, w2 = pack_block_weights(enc, learn1, learn2, dec, gain)
    stats = [x.new_empty((c1 + g.out,), dtype=param_dtype(x.dtype)) for _ in range(3)]  # mean, invstd, var

    def finalize(part, lo, hi, gamma, beta):  # a layer's statistics, written into the block's vectors
        running = None if use_batch else (running_mean[lo:hi], running_var[lo:hi])
        return bn_finalize(part, g.rows, eps, gamma, beta, running=running, out=tuple(t[lo:hi] for t in stats))[3:]

    z, part1 = conv2d_implicit_gemm(x, w1, g.K, 1, g.pad, centre_range=g.narrow, stats=use_batch, reduce_stats=False)
    prologue = _layer1_prologue(g, *finalize(part1, 0, c1, (gc, g1), (bc, b1)), slope, scale)
    u, part2 = conv2d_implicit_gemm(g.nchw(z), w2, g.K, 1, g.pad, prologue=prologue, skip_range=g.narrow,
                                    stats=use_batch, reduce_stats=False)
    scale2, shift2 = finalize(part2, c1, c1 + g.out, g2, b2)
    y = torch.empty((g.n, g.out, g.h, g.w), device=x.device, dtype=x.dtype, memory_format=_output_format(x))
    bn_act_forward(u, scale2, shift2, (0, g.out if final_act else 0), slope, scale, out=y)
    return (y, z, packed, u, *stats)


conv_block_triton = torch.library.custom_op("pnnh::conv_block_triton", mutates_args=())(_conv_block_triton)


@conv_block_triton.register_fake
def _(x, enc, learn1, learn2, dec, gc, bc, g1, b1, g2, b2, running_mean, running_var, use_batch, eps, slope, scale, gain, final_act):
    n, _, h, w = x.shape
    c1, out = enc.shape[0] + learn1.shape[0], learn2.shape[0]
    stats = x.new_empty((c1 + out,), dtype=param_dtype(x.dtype))
    return (
        torch.empty((n, out, h, w), device=x.device, dtype=x.dtype, memory_format=_output_format(x)),
        x.new_empty((n * h * w, c1)),
        x.new_empty((sum(block_shape(enc, learn1, learn2).packed_sizes()),)),
        x.new_empty((n * h * w, out)),
        stats, torch.empty_like(stats), torch.empty_like(stats),
    )


# --------------------------------------------------------------------------- backward op


def _conv_block_triton_backward(
    dy: Tensor, x: Tensor, z: Tensor, packed: Tensor, u: Tensor,
    enc: Tensor, learn1: Tensor, learn2: Tensor, dec: Optional[Tensor],
    gc: Tensor, bc: Tensor, g1: Tensor, b1: Tensor, g2: Tensor, b2: Tensor,
    mean: Tensor, invstd: Tensor,
    use_batch: bool, slope: float, scale: float, gain: float, final_act: bool, need_dx: bool,
) -> list[Tensor]:
    """Gradients of (x, enc, learn1, learn2, dec, gc, bc, g1, b1, g2, b2); dx/ddec empty when not needed."""
    g = _Geometry(x, enc, learn1, learn2)
    c1 = g.c1
    w1, w2 = packed_views(packed, block_shape(enc, learn1, learn2))

    # layer 2: one pass reduces dAct + dBN_2's sums, one launch turns them into coefficients and
    # d(gamma_2), d(beta_2); the apply then rides in the loads of layer 2's gradient convolutions
    dy_rows = g.rows_of(dy)
    out_act = (0, g.out if final_act else 0)
    stats2 = (mean[c1:], invstd[c1:], g2, b2)
    part2 = bn_act_backward_sums(dy_rows, u, *stats2, out_act, slope, scale, reduce=False)
    coef2, (dg2, db2) = bn_backward_finalize(part2, g.rows, *stats2, use_batch)
    du = GradPrologue(u, coef2[0], coef2[4], coef2[:4], *out_act, slope, scale)
    dh, _ = conv2d_implicit_gemm(g.nchw(dy_rows), w2, g.K, 1, g.pad, prologue=du._replace(saved=g.nchw(u)),
                                 transposed_weight=True, centre_range=g.narrow)

    # layer 1: dBN_c on the coder channels, dAct + dBN_1 on the learner channels, likewise
    stats1 = (mean[:c1], invstd[:c1], (gc, g1), (bc, b1))
    part1 = bn_act_backward_sums(dh, z, *stats1, (g.cc, c1), slope, scale, reduce=False)
    coef1, (dgc, dbc, dg1, db1) = bn_backward_finalize(part1, g.rows, *stats1, use_batch)
    dz = GradPrologue(z, coef1[0], coef1[4], coef1[:4], g.cc, c1, slope, scale)

    # the weight gradients: layer 2's recomputes BN_1 + act from z in one operand and du in the other
    prologue = _layer1_prologue(g, coef1[0], coef1[4], slope, scale)
    dw2 = conv2d_weight_grad(g.nchw(z), dy_rows, g.K, 1, g.pad, prologue=prologue, dy_prologue=du, skip_range=g.narrow)
    dw1 = conv2d_weight_grad(x, dh, g.K, 1, g.pad, dy_prologue=dz, centre_range=g.narrow)
    d_enc, d_learn1, d_learn2, d_dec = unpack_block_weight_grads(dw1, dw2, enc, learn1, learn2, dec, gain)

    dx = torch.empty((0,), device=x.device, dtype=x.dtype)
    if need_dx:
        dx_rows, _ = conv2d_implicit_gemm(g.nchw(dh), w1, g.K, 1, g.pad, prologue=dz._replace(saved=g.nchw(z)),
                                          transposed_weight=True, skip_range=g.narrow)
        dx = g.nchw(dx_rows)
    return [dx, d_enc, d_learn1, d_learn2, d_dec, dgc, dbc, dg1, db1, dg2, db2]


conv_block_triton_backward = torch.library.custom_op("pnnh::conv_block_triton_backward", mutates_args=())(_conv_block_triton_backward)


@conv_block_triton_backward.register_fake
def _(dy, x, z, _unused, u, enc, learn1, learn2, dec, gc, bc, g1, b1, g2, b2, mean, invstd, use_batch, slope, scale, gain, final_act, need_dx):
    n, cin, h, w = x.shape
    return [
        x.new_empty((n, h, w, cin)).permute(0, 3, 1, 2) if need_dx else x.new_empty((0,)),
        torch.empty_like(enc, memory_format=torch.contiguous_format),
        torch.empty_like(learn1, memory_format=torch.contiguous_format),
        torch.empty_like(learn2, memory_format=torch.contiguous_format),
        torch.empty_like(dec, memory_format=torch.contiguous_format) if dec is not None else x.new_empty((0,)),
        *(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (gc, bc, g1, b1, g2, b2)),
    ]


ConvBlockTritonFunction = register_block_autograd(
    conv_block_triton, conv_block_triton_backward, _conv_block_triton, _conv_block_triton_backward
)
