"""The PNNH conv block on the Triton kernels (``pnnh::conv_block_triton`` and its backward), same
signatures and autograd wiring as :mod:`.fused_conv_op`.

Forward, three kernels:
1. layer 1: one implicit-GEMM conv reads x once through ``[W_e; W_1]`` (a 1x1 coder beside a 3x3
   learner computes its centre tap only) and reduces both halves' batch statistics in its epilogue;
2. layer 2: one implicit-GEMM conv over the *pre-norm* layer-1 output ``z`` whose prologue applies
   BN_c (coder channels) and BN_1 + activation (learner channels) while loading, and whose weight is
   ``[g * W_d, W_2]`` along input channels: the coder and learner GEMMs accumulate into one tile, the
   signed copies never exist; its epilogue reduces BN_2's statistics;
3. one BN_2 + activation pass.
Backward: fused dAct + dBN_2 (reduce + apply), the layer-2 input gradient as a conv, the layer-2 weight
gradient with the same prologue (recomputing the normalised / activated input from ``z``), fused
dAct + dBN for both layer-1 halves in one pair of passes, then layer 1's input and weight gradients.
Saved: x, ``z`` and ``u`` (pre-norm, [pixels, channels]) and the statistics; nothing normalised.

Intermediates are [N*H*W, C] (NHWC); y and dx come back as channels_last NCHW tensors.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..block import BlockWeights, decoder_conv_weight, pad_kernel
from .fused_conv_op import param_dtype, register_block_autograd, running_stats
from .rows_layout import RowsLayout

from pnnh_kernels.triton_kernels import (  # noqa: E402  (the package needs triton: imported by the backend lazily)
    Prologue,
    bn_act_backward_apply,
    bn_act_backward_sums,
    bn_act_forward,
    conv2d_implicit_gemm,
    conv2d_weight_grad,
)
from pnnh_kernels.triton_kernels.bn_stats import bn_finalize
from pnnh_kernels.triton_kernels.conv_implicit_gemm import pack_input_grad_weight, pack_weight, unpack_weight


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


def _layer_weights(g: _Geometry, enc: Tensor, learn1: Tensor, learn2: Tensor, dec: Optional[Tensor], gain: float):
    """Layer 1's [C1, Cin, K, K] and layer 2's [Cout, C1, K, K] conv weights."""
    w1 = torch.cat([pad_kernel(enc, g.K), pad_kernel(learn1, g.K)])
    dec_conv = decoder_conv_weight(BlockWeights(enc, learn1, learn2, dec))
    w2 = torch.cat([pad_kernel(dec_conv, g.K) * gain, pad_kernel(learn2, g.K)], dim=1)
    return w1, w2


def _crop(weight: Tensor, size: int) -> Tensor:
    """The centre ``size x size`` of a padded kernel (inverse of pad_kernel)."""
    big = weight.shape[-1]
    p = (big - size) // 2
    return weight[..., p : p + size, p : p + size]


def _fresh(t: Tensor, like: Tensor) -> Tensor:
    """A new contiguous tensor in ``like``'s dtype (a custom op's outputs may not alias each other)."""
    return t.to(dtype=like.dtype, memory_format=torch.contiguous_format, copy=True)


def _scale_shift(mean: Tensor, invstd: Tensor, gamma: Tensor, beta: Tensor) -> tuple[Tensor, Tensor]:
    scale = gamma.to(mean.dtype) * invstd
    return scale, beta.to(mean.dtype) - mean * scale


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
    """Returns (y, z, empty, u, mean, invstd, batch_var): z = layer 1's pre-norm [pixels, C1], u =
    layer 2's pre-norm [pixels, Cout]; statistics cover [coder, learner, out] channels."""
    g = _Geometry(x, enc, learn1, learn2)
    pd = param_dtype(x.dtype)
    w1, w2 = _layer_weights(g, enc, learn1, learn2, dec, gain)

    gamma1, beta1 = torch.cat([gc, g1]), torch.cat([bc, b1])
    z, part1 = conv2d_implicit_gemm(x, pack_weight(w1), g.K, 1, g.pad, centre_range=g.narrow, stats=use_batch, reduce_stats=False)
    if use_batch:
        mean1, inv1, var1, sc1, sh1 = bn_finalize(part1, g.rows, eps, gamma1, beta1)
    else:
        mean1, inv1, var1 = running_stats(running_mean[: g.c1], running_var[: g.c1], eps, pd)
        sc1, sh1 = _scale_shift(mean1, inv1, gamma1, beta1)
    prologue = _layer1_prologue(g, sc1, sh1, slope, scale)

    u, part2 = conv2d_implicit_gemm(g.nchw(z), pack_weight(w2), g.K, 1, g.pad, prologue=prologue, skip_range=g.narrow, stats=use_batch, reduce_stats=False)
    if use_batch:
        mean2, inv2, var2, sc2, sh2 = bn_finalize(part2, g.rows, eps, g2, b2)
    else:
        mean2, inv2, var2 = running_stats(running_mean[g.c1 :], running_var[g.c1 :], eps, pd)
        sc2, sh2 = _scale_shift(mean2, inv2, g2, b2)
    y = bn_act_forward(u, sc2, sh2, (0, g.out if final_act else 0), slope, scale)
    return (
        g.nchw(y), z, x.new_empty((0,)), u,
        torch.cat([mean1, mean2]), torch.cat([inv1, inv2]), torch.cat([var1, var2]),
    )


conv_block_triton = torch.library.custom_op("pnnh::conv_block_triton", mutates_args=())(_conv_block_triton)


@conv_block_triton.register_fake
def _(x, enc, learn1, learn2, dec, gc, bc, g1, b1, g2, b2, running_mean, running_var, use_batch, eps, slope, scale, gain, final_act):
    n, _, h, w = x.shape
    c1, out = enc.shape[0] + learn1.shape[0], learn2.shape[0]
    stats = x.new_empty((c1 + out,), dtype=param_dtype(x.dtype))
    return (
        x.new_empty((n, h, w, out)).permute(0, 3, 1, 2),
        x.new_empty((n * h * w, c1)),
        x.new_empty((0,)),
        x.new_empty((n * h * w, out)),
        stats, torch.empty_like(stats), torch.empty_like(stats),
    )


# --------------------------------------------------------------------------- backward op


def _conv_block_triton_backward(
    dy: Tensor, x: Tensor, z: Tensor, _unused: Tensor, u: Tensor,
    enc: Tensor, learn1: Tensor, learn2: Tensor, dec: Optional[Tensor],
    gc: Tensor, bc: Tensor, g1: Tensor, b1: Tensor, g2: Tensor, b2: Tensor,
    mean: Tensor, invstd: Tensor,
    use_batch: bool, slope: float, scale: float, gain: float, final_act: bool, need_dx: bool,
) -> list[Tensor]:
    """Gradients of (x, enc, learn1, learn2, dec, gc, bc, g1, b1, g2, b2); dx/ddec empty when not needed."""
    g = _Geometry(x, enc, learn1, learn2)
    w1, w2 = _layer_weights(g, enc, learn1, learn2, dec, gain)
    c1 = g.c1

    # layer 2: dAct + dBN_2 -> du (the sums are also d(beta_2), d(gamma_2))
    dy_rows = g.rows_of(dy)
    out_act = (0, g.out if final_act else 0)
    stats2 = (mean[c1:], invstd[c1:], g2, b2)
    sums2 = bn_act_backward_sums(dy_rows, u, *stats2, out_act, slope, scale)
    du = bn_act_backward_apply(dy_rows, u, *stats2, sums2, use_batch, out_act, slope, scale)

    # layer 2's gradients: the input one as a conv, the weight one recomputing BN_1 + act from z
    gamma1, beta1 = torch.cat([gc, g1]), torch.cat([bc, b1])
    prologue = _layer1_prologue(g, *_scale_shift(mean[:c1], invstd[:c1], gamma1, beta1), slope, scale)
    dh, _ = conv2d_implicit_gemm(g.nchw(du), pack_input_grad_weight(w2), g.K, 1, g.pad, centre_range=g.narrow)
    dw2 = unpack_weight(conv2d_weight_grad(g.nchw(z), du, g.K, 1, g.pad, prologue=prologue, skip_range=g.narrow), g.K)

    # layer 1: dBN_c on the coder channels, dAct + dBN_1 on the learner channels, one pair of passes
    stats1 = (mean[:c1], invstd[:c1], gamma1, beta1)
    sums1 = bn_act_backward_sums(dh, z, *stats1, (g.cc, c1), slope, scale)
    dz = bn_act_backward_apply(dh, z, *stats1, sums1, use_batch, (g.cc, c1), slope, scale)
    dx = torch.empty((0,), device=x.device, dtype=x.dtype)
    if need_dx:
        dx_rows, _ = conv2d_implicit_gemm(g.nchw(dz), pack_input_grad_weight(w1), g.K, 1, g.pad, skip_range=g.narrow)
        dx = g.nchw(dx_rows)
    dw1 = unpack_weight(conv2d_weight_grad(x, dz, g.K, 1, g.pad, centre_range=g.narrow), g.K)

    d_enc = _crop(dw1[: g.cc], g.kc)
    d_learn1 = _crop(dw1[g.cc :], g.k)
    d_learn2 = _crop(dw2[:, g.cc :], g.k)
    d_dec_conv = _crop(dw2[:, : g.cc], g.kc) * gain
    if dec is None:  # tied: decoder_conv_weight = enc^T flipped
        d_enc = d_enc + d_dec_conv.flip(-1, -2).transpose(0, 1)
        d_dec = torch.empty((0,), device=x.device, dtype=x.dtype)
    else:
        d_dec = _fresh(d_dec_conv, dec)

    def bn_grads(sums, lo, hi, like):
        return _fresh(sums[1, lo:hi], like), _fresh(sums[0, lo:hi], like)

    return [
        dx,
        _fresh(d_enc, enc),
        _fresh(d_learn1, learn1),
        _fresh(d_learn2, learn2),
        d_dec,
        *bn_grads(sums1, 0, g.cc, gc),
        *bn_grads(sums1, g.cc, c1, g1),
        *bn_grads(sums2, 0, g.out, g2),
    ]


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
