"""PNNHLinear on the Triton kernels (``pnnh::linear_block_triton`` and its backward).

Forward, three kernels:
1. layer 1: one product reads x once through ``[W_e; W_1]``; its epilogue reduces the row statistics of
   the coder and the learner columns separately (each half has its own layer norm);
2. layer 2: one product over the *pre-norm* ``z`` whose prologue applies LN_c (coder columns) and
   LN_1 + activation (learner columns) while loading, against ``[g * W_d, W_2]``: the coder and learner
   products accumulate into one tile, the signed copies and the normalised hidden layer never exist;
   its epilogue reduces the output's row statistics;
3. one LN_2 + activation pass.
Backward: fused dAct + dLN_2, the hidden gradient as a product, layer 2's weight gradient with the same
prologue (recomputing the hidden layer from ``z``), fused dAct + dLN for each layer-1 half, then layer
1's input and weight gradients. Saved: x, ``z``, ``u`` (pre-norm) and the row statistics.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from pnnh_kernels.triton_kernels.linear_gemm import LnPrologue, ln_gemm, row_statistics  # needs triton: imported lazily
from pnnh_kernels.triton_kernels.ln_act_rows import ln_act_backward, ln_act_forward

from .cpu_linear import _layer2_weight


def _hidden_prologue(stats1: Tensor, gc, bc, g1, b1, gelu: bool, slope: float, scale: float) -> LnPrologue:
    return LnPrologue(stats1, torch.cat([gc, g1]), torch.cat([bc, b1]), gc.shape[0], gelu, slope, scale)


def _linear_block_triton(
    x: Tensor, enc: Tensor, learn1: Tensor, learn2: Tensor, dec: Optional[Tensor],
    gc: Tensor, bc: Tensor, g1: Tensor, b1: Tensor, g2: Tensor, b2: Tensor,
    eps: float, gelu: bool, slope: float, scale: float, gain: float, final_act: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """x: [tokens, in]. Returns (y, z, u, stats1, stats2): z/u the pre-norm layer outputs, stats [4, tokens]
    (mean, rstd of the coder then the learner columns for layer 1; the output's twice for layer 2)."""
    cc, out = enc.shape[0], learn2.shape[0]
    z, part1 = ln_gemm(x, torch.cat([enc, learn1]).t(), stats_split=cc)
    stats1 = row_statistics(part1, eps)
    prologue = _hidden_prologue(stats1, gc, bc, g1, b1, gelu, slope, scale)
    u, part2 = ln_gemm(z, _layer2_weight(enc, learn2, dec, gain).t(), prologue_a=prologue, stats_split=out)
    stats2 = row_statistics(part2, eps)
    y = ln_act_forward(u, stats2, g2, b2, final_act, gelu, slope, scale)
    return y, z, u, stats1, stats2


linear_block_triton = torch.library.custom_op("pnnh::linear_block_triton", mutates_args=())(_linear_block_triton)


@linear_block_triton.register_fake
def _(x, enc, learn1, learn2, dec, gc, bc, g1, b1, g2, b2, eps, gelu, slope, scale, gain, final_act):
    t, c1, out = x.shape[0], enc.shape[0] + learn1.shape[0], learn2.shape[0]
    stats = x.new_empty((4, t), dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)
    return x.new_empty((t, out)), x.new_empty((t, c1)), x.new_empty((t, out)), stats, torch.empty_like(stats)


def _linear_block_triton_backward(
    dy: Tensor, x: Tensor, z: Tensor, u: Tensor, enc: Tensor, learn1: Tensor, learn2: Tensor, dec: Optional[Tensor],
    gc: Tensor, bc: Tensor, g1: Tensor, b1: Tensor, g2: Tensor, b2: Tensor, stats1: Tensor, stats2: Tensor,
    gelu: bool, slope: float, scale: float, gain: float, final_act: bool,
) -> list[Tensor]:
    """Gradients of (x, enc, learn1, learn2, dec, gc, bc, g1, b1, g2, b2); ddec empty when tied."""
    cc, hid, out = enc.shape[0], learn1.shape[0], learn2.shape[0]
    act = (gelu, slope, scale)
    du = torch.empty_like(u)
    dg2, db2 = ln_act_backward(dy.contiguous(), u, du, 0, out, stats2[0], stats2[1], g2, b2, final_act, *act)
    w2 = _layer2_weight(enc, learn2, dec, gain)  # [out, Cc + C]
    dh, _ = ln_gemm(du, w2)
    dw2, _ = ln_gemm(du.t(), z, prologue_b=_hidden_prologue(stats1, gc, bc, g1, b1, *act))
    dz = torch.empty_like(z)
    dgc, dbc = ln_act_backward(dh, z, dz, 0, cc, stats1[0], stats1[1], gc, bc, False, *act)
    dg1, db1 = ln_act_backward(dh, z, dz, cc, hid, stats1[2], stats1[3], g1, b1, True, *act)
    w1 = torch.cat([enc, learn1])
    dx, _ = ln_gemm(dz, w1)
    dw1, _ = ln_gemm(dz.t(), x)
    d_decoder = dw2[:, :cc] * gain
    d_enc = dw1[:cc] + d_decoder.t() if dec is None else dw1[:cc].clone()
    d_dec = d_decoder.contiguous() if dec is not None else x.new_empty((0,))

    def fresh(t, like):  # copies: a custom op's outputs may not alias each other
        return t.to(like.dtype, copy=True)

    return [
        dx, d_enc, dw1[cc:].clone(), dw2[:, cc:].contiguous(), d_dec,
        fresh(dgc, gc), fresh(dbc, bc), fresh(dg1, g1), fresh(db1, b1), fresh(dg2, g2), fresh(db2, b2),
    ]


linear_block_triton_backward = torch.library.custom_op("pnnh::linear_block_triton_backward", mutates_args=())(
    _linear_block_triton_backward
)


@linear_block_triton_backward.register_fake
def _(dy, x, z, u, enc, learn1, learn2, dec, gc, bc, g1, b1, g2, b2, stats1, stats2, gelu, slope, scale, gain, final_act):
    return [
        torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(enc), torch.empty_like(learn1),
        torch.empty_like(learn2), torch.empty_like(dec) if dec is not None else x.new_empty((0,)),
        *(torch.empty_like(t) for t in (gc, bc, g1, b1, g2, b2)),
    ]


def _setup_context(ctx, inputs, output):
    x, enc, learn1, learn2, dec, gc, bc, g1, b1, g2, b2, _eps, gelu, slope, scale, gain, final_act = inputs
    _y, z, u, stats1, stats2 = output
    ctx.save_for_backward(x, z, u, enc, learn1, learn2, dec, gc, bc, g1, b1, g2, b2, stats1, stats2)
    ctx.flags = (gelu, slope, scale, gain, final_act)


def _backward_calling(backward_fn):
    def backward(ctx, dy, *_unused):
        saved = ctx.saved_tensors
        dec = saved[6]
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
