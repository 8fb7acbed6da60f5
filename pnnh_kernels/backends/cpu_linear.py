"""PNNHLinear on the 'cpu' backend: GEMMs in ATen, layer norm + activation fused in C++.

Layer 1 is one GEMM through ``[W_e; W_1]``; one pass per half normalises it and writes ``[z_c, act(z_l)]``
side by side into the buffer that layer 2's single GEMM (weight ``[g W_d, W_2]``) reads. Saved for backward:
the pre-norm ``z`` and ``u`` and the two concatenated weights (as eager's matmuls save theirs: rebuilding them
cost two copies a step); backward recomputes the layer-1 buffer and fuses dActivation into dLayerNorm.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .._extension import extension

_KINDS = {"gelu": 1}


def activation_kind(name: str) -> int:
    return _KINDS.get(name, 0)


def _layer1(z: Tensor, cc: int, gammas, eps: float, kind: int, slope: float, scale: float):
    """[z_c, act(z_l)] in one buffer, and each half's row statistics."""
    C = extension()
    hidden = z.shape[1] - cc
    h = torch.empty_like(z)
    gc, bc, g1, b1 = gammas
    stats_c = C.ln_act_forward(z, 0, cc, h, 0, gc, bc, eps, False, kind, slope, scale)
    stats_l = C.ln_act_forward(z, cc, hidden, h, cc, g1, b1, eps, True, kind, slope, scale)
    return h, stats_c, stats_l


def _layer2_weight(enc: Tensor, learn2: Tensor, dec: Optional[Tensor], gain: float) -> Tensor:
    decoder = enc.t() if dec is None else dec
    return torch.cat([decoder * gain, learn2], dim=1)


def _linear_block_cpu(
    x: Tensor, enc: Tensor, learn1: Tensor, learn2: Tensor, dec: Optional[Tensor],
    gc: Tensor, bc: Tensor, g1: Tensor, b1: Tensor, g2: Tensor, b2: Tensor,
    eps: float, kind: int, slope: float, scale: float, gain: float, final_act: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """x: [rows, in]. Returns (y, z, u, stats_c, stats_l, stats_out, w1, w2); stats are [2, rows] (mean, rstd),
    w1 and w2 the two layers' concatenated weights."""
    cc = enc.shape[0]
    w1 = torch.cat([enc, learn1])
    z = torch.matmul(x, w1.t()).contiguous()
    h, stats_c, stats_l = _layer1(z, cc, (gc, bc, g1, b1), eps, kind, slope, scale)
    w2 = _layer2_weight(enc, learn2, dec, gain)
    u = torch.matmul(h, w2.t()).contiguous()
    y = torch.empty_like(u)
    stats_out = extension().ln_act_forward(u, 0, u.shape[1], y, 0, g2, b2, eps, final_act, kind, slope, scale)
    return y, z, u, stats_c, stats_l, stats_out, w1, w2


linear_block_cpu = torch.library.custom_op("pnnh::linear_block_cpu", mutates_args=())(_linear_block_cpu)


@linear_block_cpu.register_fake
def _(x, enc, learn1, learn2, dec, gc, bc, g1, b1, g2, b2, eps, kind, slope, scale, gain, final_act):
    rows = x.shape[0]
    stats = x.new_empty((2, rows))
    return (
        x.new_empty((rows, learn2.shape[0])), x.new_empty((rows, enc.shape[0] + learn1.shape[0])),
        x.new_empty((rows, learn2.shape[0])), stats, torch.empty_like(stats), torch.empty_like(stats),
        x.new_empty((enc.shape[0] + learn1.shape[0], x.shape[1])), x.new_empty((learn2.shape[0], enc.shape[0] + learn2.shape[1])),
    )


def _linear_block_cpu_backward(
    dy: Tensor, x: Tensor, z: Tensor, u: Tensor, w1: Tensor, w2: Tensor, dec: Optional[Tensor],
    gc: Tensor, bc: Tensor, g1: Tensor, b1: Tensor, g2: Tensor, b2: Tensor,
    stats_c: Tensor, stats_l: Tensor, stats_out: Tensor,
    eps: float, kind: int, slope: float, scale: float, gain: float, final_act: bool,
) -> list[Tensor]:
    """Gradients of (x, enc, learn1, learn2, dec, gc, bc, g1, b1, g2, b2); ddec empty when tied."""
    C = extension()
    out, cc = g2.shape[0], gc.shape[0]
    hidden = w1.shape[0] - cc
    du = torch.empty_like(u)
    p_out = C.ln_act_backward(dy.contiguous(), 0, u, 0, out, stats_out, g2, b2, du, final_act, kind, slope, scale).sum(0)
    h, _, _ = _layer1(z, cc, (gc, bc, g1, b1), eps, kind, slope, scale)  # recomputed, not stored
    d_decoder = torch.matmul(du.t(), h[:, :cc]).mul_(gain)  # two products: no column-slice copy of one
    d_learn2 = torch.matmul(du.t(), h[:, cc:])
    # h is spent: its buffer takes dh, and dz is written over dh (the passes read each element of dh
    # before writing it; the halves are disjoint). Fresh [rows, Cc + hidden] buffers cost page faults.
    dh = torch.mm(du, w2, out=h)
    dz = dh
    p_c = C.ln_act_backward(dh, 0, z, 0, cc, stats_c, gc, bc, dz, False, kind, slope, scale).sum(0)
    p_l = C.ln_act_backward(dh, cc, z, cc, hidden, stats_l, g1, b1, dz, True, kind, slope, scale).sum(0)
    dx = torch.matmul(dz, w1)
    dw1 = torch.matmul(dz.t(), x)
    d_enc = dw1[:cc] + (d_decoder.t() if dec is None else 0)
    d_dec = d_decoder.contiguous() if dec is not None else x.new_empty((0,))

    def affine(p, like):  # copies: a custom op's outputs may not alias each other
        return p[0].to(like.dtype, copy=True), p[1].to(like.dtype, copy=True)

    return [dx, d_enc.contiguous(), dw1[cc:], d_learn2, d_dec, *affine(p_c, gc), *affine(p_l, g1), *affine(p_out, g2)]


linear_block_cpu_backward = torch.library.custom_op("pnnh::linear_block_cpu_backward", mutates_args=())(_linear_block_cpu_backward)


@linear_block_cpu_backward.register_fake
def _(dy, x, z, u, w1, w2, dec, gc, bc, g1, b1, g2, b2, stats_c, stats_l, stats_out, eps, kind, slope, scale, gain, final_act):
    cc = gc.shape[0]
    return [
        torch.empty_like(x), x.new_empty((cc, x.shape[1])), x.new_empty((w1.shape[0] - cc, x.shape[1])),
        x.new_empty((w2.shape[0], w2.shape[1] - cc)), torch.empty_like(dec) if dec is not None else x.new_empty((0,)),
        *(torch.empty_like(t) for t in (gc, bc, g1, b1, g2, b2)),
    ]


def _setup_context(ctx, inputs, output):
    x, enc, learn1, learn2, dec, gc, bc, g1, b1, g2, b2, eps, kind, slope, scale, gain, final_act = inputs
    _y, z, u, stats_c, stats_l, stats_out, w1, w2 = output
    ctx.save_for_backward(x, z, u, w1, w2, dec, gc, bc, g1, b1, g2, b2, stats_c, stats_l, stats_out)
    ctx.flags = (eps, kind, slope, scale, gain, final_act)
    ctx.set_materialize_grads(False)  # only y's gradient is used: no [rows, Cc + hidden] zeros for z's


def _backward_calling(backward_fn):
    def backward(ctx, dy, *_unused):
        x, z, u, w1, w2, dec, *norms_and_stats = ctx.saved_tensors
        if dy is None:
            dy = u.new_zeros(u.shape)
        grads = backward_fn(dy, x, z, u, w1, w2, dec, *norms_and_stats, *ctx.flags)
        dx, d_enc, d_l1, d_l2, d_dec, *affine = grads
        return (dx, d_enc, d_l1, d_l2, d_dec if dec is not None else None, *affine, *([None] * 6))

    return backward


linear_block_cpu.register_autograd(_backward_calling(linear_block_cpu_backward), setup_context=_setup_context)


class LinearBlockCpuFunction(torch.autograd.Function):
    """The same two functions without the custom-op dispatch, for eager calls (torch.compile traces the op):
    the custom op's autograd wrapper cost ~1 ms of Python a call, measured, as much as a small block's work."""

    @staticmethod
    def forward(*args):
        return _linear_block_cpu(*args)

    setup_context = staticmethod(_setup_context)
    backward = staticmethod(_backward_calling(_linear_block_cpu_backward))
