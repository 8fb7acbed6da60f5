"""PNNHLinear on the Triton kernels (``pnnh::linear_block_triton`` and its backward).

Forward, four kernels (and one per row-statistics finalisation):
0. one gather packs both layers' weights (:mod:`~pnnh_kernels.triton_kernels.block_weights`, the 1x1
   case of the conv block's), saved for backward;
1. layer 1: one product reads x once through ``[W_e; W_1]``; its epilogue reduces the row statistics of
   the coder and the learner columns separately (each half has its own layer norm);
2. layer 2: one product over the *pre-norm* ``z`` whose prologue applies LN_c (coder columns) and
   LN_1 + activation (learner columns) while loading, against ``[g * W_d, W_2]``: the coder and learner
   products accumulate into one tile, the signed copies and the normalised hidden layer never exist;
   its epilogue reduces the output's row statistics;
3. one LN_2 + activation pass.
Backward: per layer, one pass reduces the dAct + dLN sums (each token's coefficients, and the norm
parameters' gradients); both gradient products of that layer then apply dAct + dLN to the output
gradient while loading it (:class:`LnGradPrologue`), so neither ``du`` nor ``dz`` is stored. Layer 2's
weight gradient also recomputes the hidden layer from ``z`` in its other operand's prologue. Saved: x,
``z``, ``u`` (pre-norm), the row statistics and the packed weights; the weight gradients are written
in the packed layout and unpacked into the parameters' shapes by one launch.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from pnnh_kernels.triton_kernels.block_weights import block_shape, pack_block_weights, packed_views, unpack_block_weight_grads
from pnnh_kernels.triton_kernels.common import acc_dtype
from pnnh_kernels.triton_kernels.linear_gemm import ln_gemm, row_statistics  # needs triton: imported lazily
from pnnh_kernels.triton_kernels.ln_act_rows import ln_act_forward, ln_grad_sums
from pnnh_kernels.triton_kernels.ln_tiles import LnPrologue


def _hidden_norm(stats1: Tensor, gc, bc, g1, b1, gelu: bool, slope: float, scale: float) -> LnPrologue:
    """LN_c on the coder columns, LN_1 + activation on the learner's (parameters read where they lie)."""
    return LnPrologue(stats1, (gc, g1), (bc, b1), gc.shape[0], gelu, slope, scale)


def _linear_block_triton(
    x: Tensor, enc: Tensor, learn1: Tensor, learn2: Tensor, dec: Optional[Tensor],
    gc: Tensor, bc: Tensor, g1: Tensor, b1: Tensor, g2: Tensor, b2: Tensor,
    eps: float, gelu: bool, slope: float, scale: float, gain: float, final_act: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """x: [tokens, in]. Returns (y, z, u, stats1, stats2, packed): z/u the pre-norm layer outputs, stats
    [4, tokens] (mean, rstd of the coder then the learner columns for layer 1; the output's twice for
    layer 2), packed the two layers' weights (for backward)."""
    cc, out = enc.shape[0], learn2.shape[0]
    packed, w1, w2 = pack_block_weights(enc, learn1, learn2, dec, gain)
    z, part1 = ln_gemm(x, w1[0], stats_split=cc)
    stats1 = row_statistics(part1, eps)
    hidden = _hidden_norm(stats1, gc, bc, g1, b1, gelu, slope, scale)
    u, part2 = ln_gemm(z, w2[0], prologue_a=hidden, stats_split=out)
    stats2 = row_statistics(part2, eps)
    y = ln_act_forward(u, stats2, g2, b2, final_act, gelu, slope, scale)
    return y, z, u, stats1, stats2, packed


linear_block_triton = torch.library.custom_op("pnnh::linear_block_triton", mutates_args=())(_linear_block_triton)


@linear_block_triton.register_fake
def _(x, enc, learn1, learn2, dec, gc, bc, g1, b1, g2, b2, eps, gelu, slope, scale, gain, final_act):
    t, c1, out = x.shape[0], enc.shape[0] + learn1.shape[0], learn2.shape[0]
    stats = x.new_empty((4, t), dtype=acc_dtype(x.dtype))
    packed = enc.new_empty((sum(block_shape(enc, learn1, learn2).packed_sizes()),))
    return x.new_empty((t, out)), x.new_empty((t, c1)), x.new_empty((t, out)), stats, torch.empty_like(stats), packed


def _linear_block_triton_backward(
    dy: Tensor, x: Tensor, z: Tensor, u: Tensor, enc: Tensor, learn1: Tensor, learn2: Tensor, dec: Optional[Tensor],
    gc: Tensor, bc: Tensor, g1: Tensor, b1: Tensor, g2: Tensor, b2: Tensor, stats1: Tensor, stats2: Tensor,
    packed: Tensor, gelu: bool, slope: float, scale: float, gain: float, final_act: bool,
) -> list[Tensor]:
    """Gradients of (x, enc, learn1, learn2, dec, gc, bc, g1, b1, g2, b2); ddec empty when tied."""
    shape = block_shape(enc, learn1, learn2)
    w1, w2 = packed_views(packed, shape)
    act = (gelu, slope, scale)
    acc = acc_dtype(x.dtype)
    dy = dy.contiguous()  # the sums pass reads rows with unit column stride (dy of a .sum() is expanded)
    hidden = _hidden_norm(stats1, gc, bc, g1, b1, *act)
    # dln2 / dln1: dAct + dLN of each layer as a load prologue (du / dz exist only inside the products)
    dln2, dg2, db2 = ln_grad_sums(dy, u, LnPrologue(stats2, g2, b2, 0 if final_act else shape.cout, *act))
    dh, _ = ln_gemm(dy, w2[0].t(), prologue_a=dln2)
    dw2 = torch.empty_like(w2, dtype=acc)  # written in the packed layout, through a transposed view
    ln_gemm(dy.t(), z, prologue_a=dln2.t(), prologue_b=hidden, out=dw2[0].t())
    dln1, dg_hidden, db_hidden = ln_grad_sums(dh, z, hidden)
    dx, _ = ln_gemm(dh, w1[0].t(), prologue_a=dln1)
    dw1 = torch.empty_like(w1, dtype=acc)
    ln_gemm(dh.t(), x, prologue_a=dln1.t(), out=dw1[0].t())
    d_enc, d_l1, d_l2, d_dec = unpack_block_weight_grads(dw1, dw2, enc, learn1, learn2, dec, gain)

    def fresh(t, like):  # copies: a custom op's outputs may not alias each other
        return t.to(like.dtype, copy=True)

    cc = shape.cc
    return [
        dx, d_enc, d_l1, d_l2, d_dec,
        fresh(dg_hidden[:cc], gc), fresh(db_hidden[:cc], bc), fresh(dg_hidden[cc:], g1), fresh(db_hidden[cc:], b1),
        fresh(dg2, g2), fresh(db2, b2),
    ]


linear_block_triton_backward = torch.library.custom_op("pnnh::linear_block_triton_backward", mutates_args=())(
    _linear_block_triton_backward
)


@linear_block_triton_backward.register_fake
def _(dy, x, z, u, enc, learn1, learn2, dec, gc, bc, g1, b1, g2, b2, stats1, stats2, packed, gelu, slope, scale, gain, final_act):
    return [
        torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(enc), torch.empty_like(learn1),
        torch.empty_like(learn2), torch.empty_like(dec) if dec is not None else x.new_empty((0,)),
        *(torch.empty_like(t) for t in (gc, bc, g1, b1, g2, b2)),
    ]


def _setup_context(ctx, inputs, output):
    x, enc, learn1, learn2, dec, gc, bc, g1, b1, g2, b2, _eps, gelu, slope, scale, gain, final_act = inputs
    _y, z, u, stats1, stats2, packed = output
    ctx.save_for_backward(x, z, u, enc, learn1, learn2, dec, gc, bc, g1, b1, g2, b2, stats1, stats2, packed)
    ctx.set_materialize_grads(False)  # only y's gradient is used: no zero tensors for the others
    ctx.flags = (gelu, slope, scale, gain, final_act)


def _backward_calling(backward_fn):
    def backward(ctx, dy, *_unused):
        saved = ctx.saved_tensors
        dec = saved[6]
        if dy is None:  # a backward through the saved outputs only (opcheck does that)
            dy = saved[2].new_zeros(saved[2].shape)
        dx, d_enc, d_l1, d_l2, d_dec, *affine = backward_fn(dy, *saved, *ctx.flags)
        return (dx, d_enc, d_l1, d_l2, d_dec if dec is not None else None, *affine, *([None] * 6))

    return backward


linear_block_triton.register_autograd(_backward_calling(linear_block_triton_backward), setup_context=_setup_context)


class LinearBlockTritonFunction(torch.autograd.Function):
    """The same two functions without the custom-op dispatch, for eager calls (torch.compile traces the
    op): its autograd wrapper costs hundreds of microseconds a call, more than a GPU spends on the block."""

    @staticmethod
    def forward(*args):
        return _linear_block_triton(*args)

    setup_context = staticmethod(_setup_context)
    backward = staticmethod(_backward_calling(_linear_block_triton_backward))
