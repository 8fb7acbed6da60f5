"""PNNHLinear of the 'triton' backend (``pnnh::linear_block_triton`` and its backward, :mod:`..contract`'s
signatures).

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

from typing import NamedTuple

import torch
from torch import Tensor

from pnnh_kernels.triton_kernels.block_weights import (  # needs triton: the backend imports this module lazily
    block_shape,
    pack_block_weights,
    packed_views,
    unpack_block_weight_grads,
)
from pnnh_kernels.triton_kernels.launch import acc_dtype
from pnnh_kernels.triton_kernels.linear_gemm import ln_gemm, row_statistics
from pnnh_kernels.triton_kernels.ln_act_rows import ln_act_forward, ln_grad_sums
from pnnh_kernels.triton_kernels.ln_tiles import LnPrologue

from ..contract import BlockArgs, BlockGrads, BlockOp, grads_like


class LinearSaved(NamedTuple):
    z: Tensor  #: layer 1's pre-norm [tokens, Cc + H]
    u: Tensor  #: layer 2's pre-norm [tokens, out]
    stats1: Tensor  #: [4, tokens]: mean, rstd of the coder columns, then of the learner columns
    stats2: Tensor  #: [4, tokens]: the output's, twice
    packed: Tensor  #: both layers' packed weights


def _activation(a: BlockArgs) -> tuple[bool, float, float]:
    return a.gelu, a.slope, a.act_scale


def _hidden_norm(stats1: Tensor, a: BlockArgs) -> LnPrologue:
    """LN_c on the coder columns, LN_1 + activation on the learner's (parameters read where they lie)."""
    gammas, betas = (a.coder_gamma, a.learner_gamma), (a.coder_beta, a.learner_beta)
    return LnPrologue(stats1, gammas, betas, a.encoder.shape[0], *_activation(a))


def _forward(a: BlockArgs) -> tuple[Tensor, LinearSaved]:
    """x: [tokens, in]."""
    cc, out = a.encoder.shape[0], a.learner2.shape[0]
    packed, w1, w2 = pack_block_weights(a.encoder, a.learner1, a.learner2, a.decoder, a.gain, dtype=a.x.dtype)
    z, part1 = ln_gemm(a.x, w1[0], stats_split=cc)
    assert part1 is not None  # stats_split asks for the row-statistics partials
    stats1 = row_statistics(part1, a.eps)
    u, part2 = ln_gemm(z, w2[0], prologue_a=_hidden_norm(stats1, a), stats_split=out)
    assert part2 is not None
    stats2 = row_statistics(part2, a.eps)
    y = ln_act_forward(u, stats2, a.out_gamma, a.out_beta, a.final_act, *_activation(a))
    return y, LinearSaved(z, u, stats1, stats2, packed)


def _fake_forward(a: BlockArgs) -> tuple[Tensor, LinearSaved]:
    x = a.x
    t, c1, out = x.shape[0], a.encoder.shape[0] + a.learner1.shape[0], a.learner2.shape[0]
    stats = x.new_empty((4, t), dtype=acc_dtype(x.dtype))
    packed = x.new_empty((sum(block_shape(a.encoder, a.learner1, a.learner2).packed_sizes()),))
    return x.new_empty((t, out)), LinearSaved(
        x.new_empty((t, c1)), x.new_empty((t, out)), stats, torch.empty_like(stats), packed
    )


def _backward(dy: Tensor, a: BlockArgs, s: LinearSaved, need_dx: bool) -> BlockGrads:
    shape = block_shape(a.encoder, a.learner1, a.learner2)
    w1, w2 = packed_views(s.packed, shape)
    acc = acc_dtype(a.x.dtype)
    dy = dy.contiguous()  # the sums pass reads rows with unit column stride (dy of a .sum() is expanded)
    hidden = _hidden_norm(s.stats1, a)
    # dln2 / dln1: dAct + dLN of each layer as a load prologue (du / dz exist only inside the products)
    out_norm = LnPrologue(s.stats2, a.out_gamma, a.out_beta, 0 if a.final_act else shape.cout, *_activation(a))
    dln2, dg2, db2 = ln_grad_sums(dy, s.u, out_norm)
    dh, _ = ln_gemm(dy, w2[0].t(), prologue_a=dln2)
    dw2 = torch.empty_like(w2, dtype=acc)  # written in the packed layout, through a transposed view
    ln_gemm(dy.t(), s.z, prologue_a=dln2.t(), prologue_b=hidden, out=dw2[0].t())
    dln1, dg_hidden, db_hidden = ln_grad_sums(dh, s.z, hidden)
    dx, _ = ln_gemm(dh, w1[0].t(), prologue_a=dln1)
    dw1 = torch.empty_like(w1, dtype=acc)
    ln_gemm(dh.t(), a.x, prologue_a=dln1.t(), out=dw1[0].t())
    d_enc, d_l1, d_l2, d_dec = unpack_block_weight_grads(dw1, dw2, a.encoder, a.learner1, a.learner2, a.decoder, a.gain)

    def fresh(t: Tensor, like: Tensor) -> Tensor:  # copies: a custom op's outputs may not alias each other
        return t.to(like.dtype, copy=True)

    cc = shape.cc
    return BlockGrads(
        dx, d_enc, d_l1, d_l2, d_dec,
        fresh(dg_hidden[:cc], a.coder_gamma), fresh(db_hidden[:cc], a.coder_beta),
        fresh(dg_hidden[cc:], a.learner_gamma), fresh(db_hidden[cc:], a.learner_beta),
        fresh(dg2, a.out_gamma), fresh(db2, a.out_beta),
    )  # fmt: skip


def _fake_backward(dy: Tensor, a: BlockArgs, s: LinearSaved, need_dx: bool) -> list[Tensor]:
    return grads_like(a, torch.empty_like(a.x, memory_format=torch.contiguous_format), dense=False)


linear_block = BlockOp(
    "linear_block_triton",
    LinearSaved,
    _forward,
    _backward,
    fake_forward=_fake_forward,
    fake_backward=_fake_backward,
)
