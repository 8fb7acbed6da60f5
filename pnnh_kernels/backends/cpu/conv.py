"""PNNHConv2d of the 'cpu' backend, on channels-last rows (``pnnh::conv_block_cpu`` and its backward,
:mod:`..contract`'s signatures): the same math as the 'cuda' backend's :mod:`..cuda.conv`, which works in
the input's layout instead.

Between the convolutions every tensor is a [pixels, channels] matrix (NHWC), because on the CPU:
- oneDNN's convolutions run faster channels-last than NCHW (2.5x for the backward of a 16-channel 3x3
  convolution on 128x32x32 maps, micro-benchmarked on this project's 2-core Xeon), so the block converts
  an NCHW input once instead of letting oneDNN reorder around every convolution;
- a 1x1 coder's encoder and decoder become single matrix products over all pixels, accumulated in place
  (``addmm_``) into the learner's output and, in backward, into dx (no per-image batches, no sums of them);
- the fused BN passes (csrc/cpu/bn_act_rows.cpp) walk memory in order with the channels as vector lanes.

A 1x1 coder (every model's default) runs whole in C++ (csrc/cpu/conv_block_rows.cpp): its output is never
formed, only its input's moments (csrc/cpu/rows_coder.cpp), and the ~200 small tensor calls this module's
Python made per block (~2.5 ms, measured) are gone. A k x k coder runs the Python below.

Saved for backward: x, the pre-norm layer-1 halves ``zc``/``zl`` (for a 1x1 coder: x's moments and the
learner's rows) and layer 2's pre-norm ``u`` (rows), and the statistics; the normalised tensors are
recomputed.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..._extension import extension
from ..contract import BlockArgs, BlockGrads, BlockOp
from ..conv_parts import (
    CoderGrads,
    Half,
    TensorPair,
    affine_as,
    bn_grads,
    channels_last_grads_like,
    empty_unless,
    layer1_halves,
    param_dtype,
    running_stats,
)
from ..geometry import BlockGeometry, RowsLayout


class ConvSaved(NamedTuple):
    """What forward keeps for backward, beside the statistics over [coder, learner, out] channels:
    - a 1x1 coder (C++): ``zc`` holds x's moments ([Cin + 1, Cin] float64; empty under running
      statistics), ``zl`` the learner's pre-norm rows;
    - a k x k coder: the pre-norm halves as rows, both in ``zc`` ([pixels, Cc + C], ``zl`` empty) when one
      convolution computed them."""

    zc: Tensor
    zl: Tensor
    u: Tensor  #: layer 2's pre-norm rows
    mean: Tensor
    invstd: Tensor
    var: Tensor  #: the unbiased batch variance (for the running statistics)


def _conv_rows(g: RowsLayout, inp: Tensor, weight: Tensor) -> Tensor:
    """conv(inp, weight, 'same') of a rows matrix, as rows: one matrix product for a 1x1 kernel, else
    oneDNN's channels-last convolution."""
    if weight.shape[-1] == 1:
        return torch.mm(inp, weight.reshape(weight.shape[0], -1).t())
    return g.rows_of(F.conv2d(g.nchw(inp), weight, padding=weight.shape[-1] // 2))


def _conv_rows_backward(
    g: RowsLayout, grad: Tensor, inp: Tensor, weight: Tensor, need_input: bool, transposed: bool = False
) -> tuple[Any, Tensor]:
    """(input gradient as rows or None, weight gradient) of :func:`_conv_rows` (or of its transpose)."""
    if weight.shape[-1] == 1 and not transposed:
        w2d = weight.reshape(weight.shape[0], -1)
        return (torch.mm(grad, w2d) if need_input else None), torch.mm(grad.t(), inp).view(weight.shape)
    pad = weight.shape[-1] // 2
    d_in, d_w, _ = torch.ops.aten.convolution_backward(
        g.nchw(grad),
        g.nchw(inp),
        weight,
        None,
        [1, 1],
        [pad, pad],
        [1, 1],
        transposed,
        [0, 0],
        1,
        [need_input, True, False],
    )
    return (g.rows_of(d_in) if need_input else None), d_w.contiguous()


def _bn_act_rows(half: Half, stats: TensorPair, gamma_beta: TensorPair, act: bool, a: BlockArgs) -> Tensor:
    """act(BN(t[:, c0 : c0 + C])) as a new [pixels, C] matrix, one pass."""
    (t, c0), (mean, invstd), (gamma, beta) = half, stats, gamma_beta
    out = t.new_empty((t.shape[0], gamma.shape[0]))
    extension().rows_bn_act_apply(t, c0, out, 0, mean, invstd, gamma, beta, act, a.slope, a.act_scale)
    return out


def _dbn_act_rows(
    grad: Tensor, half: Half, out: Tensor, stats: TensorPair, gamma_beta: TensorPair, act: bool, a: BlockArgs
) -> Tensor:
    """dAct + dBN of one half in two fused passes, written into ``out``; returns the sums [dbeta, dgamma]."""
    (t, c0), (mean, invstd), (gamma, beta) = half, stats, gamma_beta
    C = extension()
    sums = C.rows_bn_act_backward_sums(grad, t, c0, mean, invstd, gamma, beta, act, a.slope, a.act_scale)
    C.rows_bn_act_backward_apply(
        grad, t, c0, out, mean, invstd, gamma, beta, sums, a.use_batch, act, a.slope, a.act_scale
    )
    return sums


# --------------------------------------------------------------------------- forward


def _fields(a: BlockArgs, *omit: str) -> dict[str, Any]:
    """``a`` as keyword arguments of the C++ block functions (bound with the contract's names)."""
    return {name: value for name, value in a._asdict().items() if name not in omit}


def _forward(a: BlockArgs) -> tuple[Tensor, ConvSaved]:
    g = BlockGeometry(a)
    if g.kc == 1:
        y, *saved = extension().conv_block_rows_1x1(**_fields(a, "activation"))  # the leaky family only
        return y, ConvSaved(*saved)
    return _forward_kxk_coder(g, a)


def _layer1_rows(g: BlockGeometry, xr: Tensor, a: BlockArgs) -> tuple[Tensor, Tensor]:
    """Layer 1's pre-norm halves as rows (one convolution reads x for both when the kernels agree)."""
    if g.joint:
        return _conv_rows(g, xr, torch.cat([a.encoder, a.learner1])), xr.new_empty((0,))
    return _conv_rows(g, xr, a.encoder), _conv_rows(g, xr, a.learner1)


def _batch_stats(half: tuple[Tensor, int], cn: int, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    return extension().rows_batch_stats(half[0], half[1], cn, eps)


def _forward_kxk_coder(g: BlockGeometry, a: BlockArgs) -> tuple[Tensor, ConvSaved]:
    cc, hid = g.cc, g.hid
    pd = param_dtype(a.x.dtype)
    gc, bc, g1, b1, g2, b2 = affine_as(a, pd)
    running = None if a.use_batch else running_stats(a, pd)

    zc_pre, zl_pre = _layer1_rows(g, g.rows_of(a.x), a)
    halves = layer1_halves(g, zc_pre, zl_pre)
    if running is None:
        mean1, inv1, var1 = (
            torch.cat(p) for p in zip(_batch_stats(halves[0], cc, a.eps), _batch_stats(halves[1], hid, a.eps))
        )
    else:
        mean1, inv1, var1 = (t[: cc + hid] for t in running)

    al = _bn_act_rows(halves[1], (mean1[cc:], inv1[cc:]), (g1, b1), True, a)
    u = _conv_rows(g, al, a.learner2)
    zc = _bn_act_rows(halves[0], (mean1[:cc], inv1[:cc]), (gc, bc), False, a)
    if a.decoder is None:
        decoded = F.conv_transpose2d(g.nchw(zc), a.encoder, padding=g.kc // 2)
    else:
        decoded = F.conv2d(g.nchw(zc), a.decoder, padding=g.kc // 2)
    u.add_(g.rows_of(decoded), alpha=a.gain)

    if running is None:
        mean2, inv2, var2 = _batch_stats((u, 0), g.out, a.eps)
    else:
        mean2, inv2, var2 = (t[cc + hid :] for t in running)
    y = torch.empty_like(u)
    extension().rows_bn_act_apply(u, 0, y, 0, mean2, inv2, g2, b2, a.final_act, a.slope, a.act_scale)
    saved = ConvSaved(zc_pre, zl_pre, u, torch.cat([mean1, mean2]), torch.cat([inv1, inv2]), torch.cat([var1, var2]))
    return g.nchw(y), saved


def _fake_forward(a: BlockArgs) -> tuple[Tensor, ConvSaved]:
    x, g = a.x, BlockGeometry(a)
    stats = x.new_empty((g.channels,), dtype=param_dtype(x.dtype))
    if g.kc == 1:
        zc = x.new_empty((g.cin + 1, g.cin) if a.use_batch else (0,), dtype=torch.float64)
        zl = x.new_empty((g.rows, g.hid))
    elif g.joint:
        zc, zl = x.new_empty((g.rows, g.c1)), x.new_empty((0,))
    else:
        zc, zl = x.new_empty((g.rows, g.cc)), x.new_empty((g.rows, g.hid))
    saved = ConvSaved(zc, zl, x.new_empty((g.rows, g.out)), stats, torch.empty_like(stats), torch.empty_like(stats))
    return g.nchw(x.new_empty((g.rows, g.out))), saved


# --------------------------------------------------------------------------- backward


def _backward(dy: Tensor, a: BlockArgs, s: ConvSaved, need_dx: bool) -> BlockGrads:
    g = BlockGeometry(a)
    if g.kc == 1:
        options = _fields(a, "running_mean", "running_var", "eps", "activation")
        saved = dict(zc=s.zc, zl=s.zl, u=s.u, mean=s.mean, invstd=s.invstd)
        return BlockGrads(*extension().conv_block_rows_1x1_backward(dy=dy, **options, **saved, need_dx=need_dx))
    return _backward_kxk_coder(dy, g, a, s, need_dx)


def _coder_backward(g: BlockGeometry, du: Tensor, zc: Tensor, a: BlockArgs) -> CoderGrads:
    """(d zc, the decoder's share of d encoder, d decoder) through ``u += gain * decode(zc)``."""
    weight = a.encoder if a.decoder is None else a.decoder
    d_zc, d_w = _conv_rows_backward(g, du, zc, weight, True, transposed=a.decoder is None)
    if a.gain != 1.0:  # the backward is linear in the gradient: scale the results, not du
        d_zc.mul_(a.gain)
        d_w.mul_(a.gain)
    return (d_zc, d_w, None) if a.decoder is None else (d_zc, None, d_w)


def _layer1_input_backward(
    g: BlockGeometry, dzc: Tensor, dzl: Tensor, a: BlockArgs, need_dx: bool
) -> tuple[Optional[Tensor], Tensor, Tensor]:
    """(dx as rows, d encoder, d learner1) through layer 1's convolutions (``dzc`` holds both halves'
    gradients when they are joint)."""
    xr = g.rows_of(a.x)
    if g.joint:
        dx, d_cat = _conv_rows_backward(g, dzc, xr, torch.cat([a.encoder, a.learner1]), need_dx)
        return dx, d_cat[: g.cc].clone(), d_cat[g.cc :].clone()
    dx, d_learn1 = _conv_rows_backward(g, dzl, xr, a.learner1, need_dx)
    dx_c, d_enc = _conv_rows_backward(g, dzc, xr, a.encoder, need_dx)
    if need_dx:
        dx.add_(dx_c)
    return dx, d_enc, d_learn1


def _backward_kxk_coder(dy: Tensor, g: BlockGeometry, a: BlockArgs, s: ConvSaved, need_dx: bool) -> BlockGrads:
    cc, c1 = g.cc, g.c1
    gc, bc, g1, b1, g2, b2 = affine_as(a, param_dtype(a.x.dtype))
    mean, invstd = s.mean, s.invstd
    coder_stats, learner_stats = (mean[:cc], invstd[:cc]), (mean[cc:c1], invstd[cc:c1])

    du = torch.empty_like(s.u)
    sums2 = _dbn_act_rows(g.rows_of(dy), (s.u, 0), du, (mean[c1:], invstd[c1:]), (g2, b2), a.final_act, a)

    # recompute layer 1's activated learner half instead of having stored it; then its dAct + dBN_1
    halves = layer1_halves(g, s.zc, s.zl)
    al = _bn_act_rows(halves[1], learner_stats, (g1, b1), True, a)
    d_al, d_learn2 = _conv_rows_backward(g, du, al, a.learner2, True)
    dzl = torch.empty_like(halves[1][0])
    sums_1 = _dbn_act_rows(d_al, halves[1], dzl, learner_stats, (g1, b1), True, a)

    # the coder: its normalised half recomputed, its convolutions' gradients, dBN_c
    zc = _bn_act_rows(halves[0], coder_stats, (gc, bc), False, a)
    d_zc, d_enc_decode, d_dec = _coder_backward(g, du, zc, a)
    dzc = dzl if g.joint else torch.empty_like(halves[0][0])
    sums_c = _dbn_act_rows(d_zc, halves[0], dzc, coder_stats, (gc, bc), False, a)

    dx, d_enc, d_learn1 = _layer1_input_backward(g, dzc, dzl, a, need_dx)
    if d_enc_decode is not None:
        d_enc = d_enc + d_enc_decode
    return BlockGrads(
        g.nchw(dx) if dx is not None else a.x.new_empty((0,)), d_enc, d_learn1, d_learn2, empty_unless(d_dec, a.x),
        *bn_grads(sums_c, a.coder_gamma), *bn_grads(sums_1, a.learner_gamma), *bn_grads(sums2, a.out_gamma),
    )  # fmt: skip


def _fake_backward(dy: Tensor, a: BlockArgs, s: ConvSaved, need_dx: bool) -> list[Tensor]:
    return channels_last_grads_like(a, need_dx)


conv_block = BlockOp(
    "conv_block_cpu",
    ConvSaved,
    _forward,
    _backward,
    fake_forward=_fake_forward,
    fake_backward=_fake_backward,
)
