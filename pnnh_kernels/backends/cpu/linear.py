"""PNNHLinear of the 'cpu' backend (``pnnh::linear_block_cpu`` and its backward, :mod:`..contract`'s
signatures): GEMMs in ATen, layer norm + activation fused in C++.

Layer 1 is one GEMM through ``[W_e; W_1]``; one pass per half normalises it and writes ``[z_c, act(z_l)]``
side by side into the buffer that layer 2's single GEMM (weight ``[g W_d, W_2]``) reads. Saved for backward:
the pre-norm ``z`` and ``u`` and the two concatenated weights (as eager's matmuls save theirs: rebuilding them
cost two copies a step); backward recomputes the layer-1 buffer and fuses dActivation into dLayerNorm.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from ..._extension import extension
from ..contract import BlockArgs, BlockGrads, BlockOp


class LinearSaved(NamedTuple):
    z: Tensor  #: layer 1's pre-norm [rows, Cc + H]
    u: Tensor  #: layer 2's pre-norm [rows, out]
    stats_c: Tensor  #: [2, rows] (mean, rstd) of the coder columns of z
    stats_l: Tensor  #: likewise of the learner columns
    stats_out: Tensor  #: likewise of u
    w1: Tensor  #: [W_e; W_1]
    w2: Tensor  #: [g W_d, W_2]


def _affine(a: BlockArgs) -> list[Tensor]:
    # the passes read gamma and beta with unit stride; checked first, a no-op call still costs a dispatch
    return [t if t.is_contiguous() else t.contiguous() for t in a.affine]


def _layer1(z: Tensor, a: BlockArgs, affine: list[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """[z_c, act(z_l)] in one buffer, and each half's row statistics."""
    C = extension()
    cc = a.encoder.shape[0]
    hidden = z.shape[1] - cc
    h = torch.empty_like(z)
    gc, bc, g1, b1 = affine[:4]
    act = (a.activation, a.slope, a.act_scale)
    stats_c = C.ln_act_forward(z, 0, cc, h, 0, gc, bc, a.eps, False, *act)
    stats_l = C.ln_act_forward(z, cc, hidden, h, cc, g1, b1, a.eps, True, *act)
    return h, stats_c, stats_l


def _layer2_weight(a: BlockArgs) -> Tensor:
    decoder = a.encoder.t() if a.decoder is None else a.decoder
    return torch.cat([decoder * a.gain, a.learner2], dim=1)


def _forward(a: BlockArgs) -> tuple[Tensor, LinearSaved]:
    """x: [rows, in]."""
    affine = _affine(a)
    w1 = torch.cat([a.encoder, a.learner1])
    z = torch.matmul(a.x, w1.t()).contiguous()
    h, stats_c, stats_l = _layer1(z, a, affine)
    w2 = _layer2_weight(a)
    u = torch.matmul(h, w2.t()).contiguous()
    y = torch.empty_like(u)
    act = (a.activation, a.slope, a.act_scale)
    g2, b2 = affine[4:]
    stats_out = extension().ln_act_forward(u, 0, u.shape[1], y, 0, g2, b2, a.eps, a.final_act, *act)
    return y, LinearSaved(z, u, stats_c, stats_l, stats_out, w1, w2)


def _fake_forward(a: BlockArgs) -> tuple[Tensor, LinearSaved]:
    x = a.x
    rows, c1, out = x.shape[0], a.encoder.shape[0] + a.learner1.shape[0], a.learner2.shape[0]
    stats = x.new_empty((2, rows))
    saved = LinearSaved(
        x.new_empty((rows, c1)), x.new_empty((rows, out)), stats, torch.empty_like(stats), torch.empty_like(stats),
        x.new_empty((c1, x.shape[1])), x.new_empty((out, a.encoder.shape[0] + a.learner2.shape[1])),
    )  # fmt: skip
    return x.new_empty((rows, out)), saved


def _norm_grads(partials: Tensor, gamma: Tensor) -> tuple[Tensor, Tensor]:
    """(d gamma, d beta) from a pass's [2, C] sums; copies: a custom op's outputs may not alias each other."""
    return partials[0].to(gamma.dtype, copy=True), partials[1].to(gamma.dtype, copy=True)


def _backward(dy: Tensor, a: BlockArgs, s: LinearSaved, need_dx: bool) -> BlockGrads:
    C = extension()
    cc, out = a.encoder.shape[0], a.learner2.shape[0]
    hidden = s.w1.shape[0] - cc
    affine = _affine(a)
    gc, bc, g1, b1, g2, b2 = affine
    act = (a.activation, a.slope, a.act_scale)
    du = torch.empty_like(s.u)
    p_out = C.ln_act_backward(dy.contiguous(), 0, s.u, 0, out, s.stats_out, g2, b2, du, a.final_act, *act).sum(0)
    h, _, _ = _layer1(s.z, a, affine)  # recomputed, not stored
    d_decoder = torch.matmul(du.t(), h[:, :cc]).mul_(a.gain)  # two products: no column-slice copy of one
    d_learn2 = torch.matmul(du.t(), h[:, cc:])
    # h is spent: its buffer takes dh, and dz is written over dh (the passes read each element of dh
    # before writing it; the halves are disjoint). Fresh [rows, Cc + hidden] buffers cost page faults.
    dh = torch.mm(du, s.w2, out=h)
    dz = dh
    p_c = C.ln_act_backward(dh, 0, s.z, 0, cc, s.stats_c, gc, bc, dz, False, *act).sum(0)
    p_l = C.ln_act_backward(dh, cc, s.z, cc, hidden, s.stats_l, g1, b1, dz, True, *act).sum(0)
    dx = torch.matmul(dz, s.w1)
    dw1 = torch.matmul(dz.t(), a.x)
    d_enc = dw1[:cc] + (d_decoder.t() if a.decoder is None else 0)
    d_dec = d_decoder.contiguous() if a.decoder is not None else a.x.new_empty((0,))
    return BlockGrads(
        dx, d_enc.contiguous(), dw1[cc:], d_learn2, d_dec,
        *_norm_grads(p_c, gc), *_norm_grads(p_l, g1), *_norm_grads(p_out, g2),
    )  # fmt: skip


def _fake_backward(dy: Tensor, a: BlockArgs, s: LinearSaved, need_dx: bool) -> list[Tensor]:
    x = a.x
    cc = a.encoder.shape[0]
    return [
        torch.empty_like(x), x.new_empty((cc, x.shape[1])), x.new_empty((s.w1.shape[0] - cc, x.shape[1])),
        x.new_empty((s.w2.shape[0], s.w2.shape[1] - cc)),
        torch.empty_like(a.decoder) if a.decoder is not None else x.new_empty((0,)),
        *(torch.empty_like(t) for t in a.affine),
    ]  # fmt: skip


linear_block = BlockOp(
    "linear_block_cpu",
    LinearSaved,
    _forward,
    _backward,
    fake_forward=_fake_forward,
    fake_backward=_fake_backward,
)
