"""PNNHConv2d of the 'triton' backend (``pnnh::conv_block_triton`` and its backward, :mod:`..contract`'s
signatures).

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

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from pnnh_kernels.triton_kernels import (  # the package needs triton: the backend imports this module lazily
    GradPrologue,
    Prologue,
    bn_act_backward_sums,
    bn_act_forward,
    conv2d_implicit_gemm,
    conv2d_weight_grad,
)
from pnnh_kernels.triton_kernels.block_weights import (
    block_shape,
    pack_block_weights,
    packed_views,
    unpack_block_weight_grads,
)
from pnnh_kernels.triton_kernels.bn_stats import bn_backward_finalize, bn_finalize
from pnnh_kernels.triton_kernels.launch import Pair

from ..contract import BlockArgs, BlockGrads, BlockOp
from ..conv_parts import channels_last_grads_like, param_dtype
from ..geometry import BlockGeometry, memory_format_of


class ConvSaved(NamedTuple):
    z: Tensor  #: layer 1's pre-norm [pixels, Cc + H]
    packed: Tensor  #: both layers' packed weights
    u: Tensor  #: layer 2's pre-norm [pixels, Cout]
    mean: Tensor  #: [Cc + H + Cout]
    invstd: Tensor
    var: Tensor  #: the unbiased batch variance (for the running statistics)


def _narrow(g: BlockGeometry) -> tuple[int, int]:
    """The channels of z whose weights are centre-only in the joint ``g.kernel``-sized kernel: a 1x1 coder's
    beside a k x k learner (or the reverse); (0, 0) when both halves have the kernel's size."""
    if g.kc < g.kernel:
        return (0, g.cc)
    if g.k < g.kernel:
        return (g.cc, g.c1)
    return (0, 0)


def _layer1_prologue(g: BlockGeometry, bn_scale: Tensor, bn_shift: Tensor, a: BlockArgs) -> Prologue:
    """BN_c on the coder channels of z, BN_1 + activation on the learner channels (``bn_scale`` /
    ``bn_shift``: per channel of both halves, gamma * invstd and beta - mean * gamma * invstd)."""
    return Prologue(bn_scale, bn_shift, g.cc, g.c1, a.slope, a.act_scale)


# --------------------------------------------------------------------------- forward


def _forward(a: BlockArgs) -> tuple[Tensor, ConvSaved]:
    x = a.x
    g = BlockGeometry(a)
    c1, kernel, pad, narrow = g.c1, g.kernel, g.kernel // 2, _narrow(g)
    packed, w1, w2 = pack_block_weights(a.encoder, a.learner1, a.learner2, a.decoder, a.gain, dtype=x.dtype)
    stats = [x.new_empty((g.channels,), dtype=param_dtype(x.dtype)) for _ in range(3)]  # mean, invstd, var

    def finalize(part: Optional[Tensor], lo: int, hi: int, gamma: Pair, beta: Pair) -> tuple[Tensor, Tensor]:
        """A layer's statistics, written into the block's vectors; returns the next prologue's (scale, shift)."""
        running = None if a.use_batch else (a.running_mean[lo:hi], a.running_var[lo:hi])  # type: ignore[index]
        views = (stats[0][lo:hi], stats[1][lo:hi], stats[2][lo:hi])
        _mean, _invstd, _var, scale, shift = bn_finalize(part, a.eps, gamma, beta, running=running, out=views)
        return scale, shift

    z, part1 = conv2d_implicit_gemm(x, w1, kernel, 1, pad, centre_range=narrow, stats=a.use_batch, reduce_stats=False)
    bn1 = finalize(part1, 0, c1, (a.coder_gamma, a.learner_gamma), (a.coder_beta, a.learner_beta))
    u, part2 = conv2d_implicit_gemm(
        g.nchw(z), w2, kernel, 1, pad, prologue=_layer1_prologue(g, *bn1, a), skip_range=narrow,
        stats=a.use_batch, reduce_stats=False,
    )  # fmt: skip
    scale2, shift2 = finalize(part2, c1, g.channels, a.out_gamma, a.out_beta)
    y = torch.empty((g.n, g.out, g.h, g.w), device=x.device, dtype=x.dtype, memory_format=memory_format_of(x))
    bn_act_forward(u, scale2, shift2, (0, g.out if a.final_act else 0), a.slope, a.act_scale, out=y)
    return y, ConvSaved(z, packed, u, *stats)


def _fake_forward(a: BlockArgs) -> tuple[Tensor, ConvSaved]:
    x, g = a.x, BlockGeometry(a)
    stats = x.new_empty((g.channels,), dtype=param_dtype(x.dtype))
    saved = ConvSaved(
        x.new_empty((g.rows, g.c1)),
        x.new_empty((sum(block_shape(a.encoder, a.learner1, a.learner2).packed_sizes()),)),
        x.new_empty((g.rows, g.out)),
        stats, torch.empty_like(stats), torch.empty_like(stats),
    )  # fmt: skip
    y = torch.empty((g.n, g.out, g.h, g.w), device=x.device, dtype=x.dtype, memory_format=memory_format_of(x))
    return y, saved


# --------------------------------------------------------------------------- backward


def _backward(dy: Tensor, a: BlockArgs, s: ConvSaved, need_dx: bool) -> BlockGrads:
    g = BlockGeometry(a)
    c1, kernel, pad, narrow = g.c1, g.kernel, g.kernel // 2, _narrow(g)
    w1, w2 = packed_views(s.packed, block_shape(a.encoder, a.learner1, a.learner2))
    mean, invstd = s.mean, s.invstd

    # layer 2: one pass reduces dAct + dBN_2's sums, one launch turns them into coefficients and
    # d(gamma_2), d(beta_2); the apply then rides in the loads of layer 2's gradient convolutions
    dy_rows = g.rows_of(dy)
    out_act = (0, g.out if a.final_act else 0)
    stats2 = (mean[c1:], invstd[c1:], a.out_gamma, a.out_beta)
    part2 = bn_act_backward_sums(dy_rows, s.u, *stats2, out_act, a.slope, a.act_scale, reduce=False)
    coef2, (dg2, db2) = bn_backward_finalize(part2, g.rows, *stats2, a.use_batch)
    du = GradPrologue(s.u, coef2[0], coef2[4], coef2[:4], *out_act, a.slope, a.act_scale)
    dh, _ = conv2d_implicit_gemm(
        g.nchw(dy_rows), w2, kernel, 1, pad, prologue=du._replace(saved=g.nchw(s.u)),
        transposed_weight=True, centre_range=narrow,
    )  # fmt: skip

    # layer 1: dBN_c on the coder channels, dAct + dBN_1 on the learner channels, likewise
    stats1 = (mean[:c1], invstd[:c1], (a.coder_gamma, a.learner_gamma), (a.coder_beta, a.learner_beta))
    part1 = bn_act_backward_sums(dh, s.z, *stats1, (g.cc, c1), a.slope, a.act_scale, reduce=False)
    coef1, (dgc, dbc, dg1, db1) = bn_backward_finalize(part1, g.rows, *stats1, a.use_batch)
    dz = GradPrologue(s.z, coef1[0], coef1[4], coef1[:4], g.cc, c1, a.slope, a.act_scale)

    # the weight gradients: layer 2's recomputes BN_1 + act from z in one operand and du in the other
    prologue = _layer1_prologue(g, coef1[0], coef1[4], a)
    dw2 = conv2d_weight_grad(g.nchw(s.z), dy_rows, kernel, 1, pad, prologue=prologue, dy_prologue=du, skip_range=narrow)
    dw1 = conv2d_weight_grad(a.x, dh, kernel, 1, pad, dy_prologue=dz, centre_range=narrow)
    d_enc, d_learn1, d_learn2, d_dec = unpack_block_weight_grads(
        dw1, dw2, a.encoder, a.learner1, a.learner2, a.decoder, a.gain
    )

    dx = torch.empty((0,), device=a.x.device, dtype=a.x.dtype)
    if need_dx:
        dx_rows, _ = conv2d_implicit_gemm(
            g.nchw(dh), w1, kernel, 1, pad, prologue=dz._replace(saved=g.nchw(s.z)),
            transposed_weight=True, skip_range=narrow,
        )  # fmt: skip
        dx = g.nchw(dx_rows)
    return BlockGrads(dx, d_enc, d_learn1, d_learn2, d_dec, dgc, dbc, dg1, db1, dg2, db2)


def _fake_backward(dy: Tensor, a: BlockArgs, s: ConvSaved, need_dx: bool) -> list[Tensor]:
    return channels_last_grads_like(a, need_dx)


conv_block = BlockOp(
    "conv_block_triton",
    ConvSaved,
    _forward,
    _backward,
    fake_forward=_fake_forward,
    fake_backward=_fake_backward,
)
