"""PNNHConv2d of the 'cuda' backend: fused passes around library convolutions on planar (NCHW) tensors
(``pnnh::conv_block_fused`` and its backward, :mod:`..contract`'s signatures).

Forward: one convolution reads x through ``[W_e; W_1]``; one pass reduces the batch statistics of
both halves; one pass writes the normalised coder half and the activated learner half (never the
signed copies); layer 2 is one convolution for the learner whose output the decoder GEMM accumulates
into in place; then one statistics pass and one BN + activation pass. Only the pre-norm outputs
``z`` (layer 1) and ``u`` (layer 2) are saved; backward recomputes the normalised tensors and fuses
dReLU into dBN (one reduction pass and one apply pass per layer, whose sums are also the BN
parameter gradients).

The convolutions are cuDNN's / cuBLAS's; the passes between them are the extension's CUDA kernels.
The extension's planar C++ passes run the same op on CPU tensors, which is how the tests check this
module without a GPU (the 'cpu' backend itself runs the channels-last :mod:`..cpu.conv`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..._extension import extension
from ..contract import BlockArgs, BlockGrads, BlockOp, grads_like
from ..conv_parts import (
    CoderGrads,
    Half,
    Halves,
    TensorPair,
    affine_as,
    bn_grads,
    empty_unless,
    layer1_halves,
    param_dtype,
    running_stats,
    stats_from_sums,
    weights_in_data_dtype,
)


class PlanarSaved(NamedTuple):
    """What forward keeps for backward. ``zc``/``zl`` are layer 1's pre-norm halves as [N, C, H*W]; when
    coder and learner kernels agree one convolution computed them and ``zc`` holds both (``zl`` empty)."""

    zc: Tensor
    zl: Tensor
    u: Tensor  #: layer 2's pre-norm output, [N, Cout, H*W]
    mean: Tensor  #: [Cc + H + Cout]
    invstd: Tensor
    var: Tensor  #: the unbiased batch variance (for the running statistics)


class _Widths(NamedTuple):
    cc: int
    hid: int
    out: int
    kc: int
    k: int


def _widths(a: BlockArgs) -> _Widths:
    return _Widths(
        a.encoder.shape[0], a.learner1.shape[0], a.learner2.shape[0], a.encoder.shape[-1], a.learner1.shape[-1]
    )


def _stats(z3: Tensor, c0: int, cn: int, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """(mean, invstd, unbiased var) of channels [c0, c0 + cn) from one fused reduction pass (float64 sums)."""
    count = z3.shape[0] * z3.shape[2]
    return stats_from_sums(extension().channel_sums(z3, c0, cn), count, eps, param_dtype(z3.dtype))


def _layer1_conv(x: Tensor, enc: Tensor, learn1: Tensor) -> tuple[Tensor, Tensor]:
    """Layer 1's pre-norm outputs as [N, C, H*W]: one convolution when the kernels agree (both halves in
    the first tensor), else the 1x1 coder as a GEMM over x beside the learner's convolution (no concatenation)."""
    n, cin, h, w = x.shape
    kc, k = enc.shape[-1], learn1.shape[-1]
    if kc == k:
        z = F.conv2d(x, torch.cat([enc, learn1]), padding=k // 2)
        return z.contiguous().view(n, -1, h * w), x.new_empty((0,))
    if kc == 1:
        zc = torch.matmul(enc.view(enc.shape[0], cin), x.view(n, cin, h * w))
    else:
        zc = F.conv2d(x, enc, padding=kc // 2).contiguous().view(n, -1, h * w)
    zl = F.conv2d(x, learn1, padding=k // 2).contiguous().view(n, -1, h * w)
    return zc, zl


def _layer1_apply(
    halves: Halves, widths: _Widths, mean: Tensor, invstd: Tensor, affine: Sequence[Tensor], a: BlockArgs
) -> tuple[Tensor, Tensor]:
    """Normalised coder half and activated learner half of layer 1, one pass each."""
    (tc, oc), (tl, ol) = halves
    cc, hid = widths.cc, widths.hid
    n, hw = tc.shape[0], tc.shape[2]
    zc = tc.new_empty((n, cc, hw))
    al = tc.new_empty((n, hid, hw))
    gc, bc, g1, b1 = affine[:4]
    extension().bn_act_apply(tc, oc, zc, mean[:cc], invstd[:cc], gc, bc, False, a.slope, a.scale)
    extension().bn_act_apply(tl, ol, al, mean[cc:], invstd[cc:], g1, b1, True, a.slope, a.scale)
    return zc, al


def _decoder_matrix(enc: Tensor, dec: Optional[Tensor]) -> Tensor:
    """M with ``decode(z) = M @ z`` for 1x1 coders: [out, Cc]."""
    return enc[:, :, 0, 0].t() if dec is None else dec[:, :, 0, 0]


def _conv_bwd(
    grad: Tensor, inp: Tensor, weight: Tensor, padding: int, transposed: bool, need_input: bool
) -> tuple[Any, Tensor]:
    """(input gradient, None unless ``need_input``; weight gradient) of a stride-1 convolution."""
    d_in, d_w, _ = torch.ops.aten.convolution_backward(
        grad, inp, weight, None, [1, 1], [padding, padding], [1, 1], transposed, [0, 0], 1, [need_input, True, False]
    )
    return d_in, d_w


# --------------------------------------------------------------------------- forward


def _layer1_batch_stats(a: BlockArgs, halves: Halves, w: _Widths) -> tuple[Tensor, Tensor, Tensor]:
    stats = [_stats(t, c0, cn, a.eps) for (t, c0), cn in zip(halves, (w.cc, w.hid))]
    return tuple(torch.cat(parts) for parts in zip(*stats))  # type: ignore[return-value]


def _decode_into(u: Tensor, zc: Tensor, a: BlockArgs, w: _Widths) -> None:
    """u += gain * decode(zc): for a 1x1 coder the decoder GEMM accumulates into the learner's output
    tile (no separate add pass)."""
    n, _, h, wd = u.shape
    if w.kc == 1:
        m = _decoder_matrix(a.encoder, a.decoder)
        u.view(n, w.out, h * wd).baddbmm_(m.unsqueeze(0).expand(n, -1, -1), zc, alpha=a.gain)
    elif a.decoder is None:
        u.add_(F.conv_transpose2d(zc.view(n, w.cc, h, wd), a.encoder, padding=w.kc // 2), alpha=a.gain)
    else:
        u.add_(F.conv2d(zc.view(n, w.cc, h, wd), a.decoder, padding=w.kc // 2), alpha=a.gain)


def _forward(a: BlockArgs) -> tuple[Tensor, PlanarSaved]:
    a = weights_in_data_dtype(a)
    x = a.x.contiguous()
    n, _, h, wd = x.shape
    w = _widths(a)
    c1 = w.cc + w.hid
    affine = affine_as(a, param_dtype(x.dtype))
    running = None if a.use_batch else running_stats(a, param_dtype(x.dtype))
    zc_pre, zl_pre = _layer1_conv(x, a.encoder, a.learner1)
    halves = layer1_halves(zc_pre, zl_pre, w.cc)
    if running is None:
        mean1, inv1, var1 = _layer1_batch_stats(a, halves, w)
    else:
        mean1, inv1, var1 = (t[:c1] for t in running)
    zc, al = _layer1_apply(halves, w, mean1, inv1, affine, a)

    u = F.conv2d(al.view(n, w.hid, h, wd), a.learner2, padding=w.k // 2).contiguous()
    _decode_into(u, zc, a, w)
    u3 = u.view(n, w.out, h * wd)
    if running is None:
        mean2, inv2, var2 = _stats(u3, 0, w.out, a.eps)
    else:
        mean2, inv2, var2 = (t[c1:] for t in running)
    y = torch.empty_like(u3)
    extension().bn_act_apply(u3, 0, y, mean2, inv2, affine[4], affine[5], a.final_act, a.slope, a.scale)
    saved = PlanarSaved(zc_pre, zl_pre, u3, torch.cat([mean1, mean2]), torch.cat([inv1, inv2]), torch.cat([var1, var2]))
    return y.view(n, w.out, h, wd), saved


def _fake_forward(a: BlockArgs) -> tuple[Tensor, PlanarSaved]:
    x, w = a.x, _widths(a)
    n, _, h, wd = x.shape
    stats = x.new_empty((w.cc + w.hid + w.out,), dtype=param_dtype(x.dtype))
    joint = w.kc == w.k
    saved = PlanarSaved(
        x.new_empty((n, w.cc + w.hid if joint else w.cc, h * wd)),
        x.new_empty((0,)) if joint else x.new_empty((n, w.hid, h * wd)),
        x.new_empty((n, w.out, h * wd)),
        stats, torch.empty_like(stats), torch.empty_like(stats),
    )  # fmt: skip
    return x.new_empty((n, w.out, h, wd)), saved


# --------------------------------------------------------------------------- backward


def _dbn_act(
    dy3: Tensor, half: Half, out: Tensor, stats: TensorPair, gamma_beta: TensorPair, use_act: bool, a: BlockArgs
) -> Tensor:
    """dAct + dBN of one half in two fused passes, written into ``out``; returns the sums [dbeta, dgamma]."""
    (t, c0), (mean, invstd), (gamma, beta) = half, stats, gamma_beta
    C = extension()
    sums = C.bn_act_backward_sums(dy3, t, c0, mean, invstd, gamma, beta, use_act, a.slope, a.scale)
    C.bn_act_backward_apply(dy3, t, c0, out, mean, invstd, gamma, beta, sums, a.use_batch, use_act, a.slope, a.scale)
    return sums


def _decoder_backward(du3: Tensor, zc: Tensor, a: BlockArgs, w: _Widths) -> CoderGrads:
    """(d zc, the decoder's share of d encoder, d decoder) through ``u += gain * decode(zc)``."""
    n, h, wd = a.x.shape[0], a.x.shape[2], a.x.shape[3]
    if w.kc == 1:
        m = _decoder_matrix(a.encoder, a.decoder)
        d_zc = torch.matmul(m.t() * a.gain, du3)
        d_m = torch.bmm(du3, zc.transpose(1, 2)).sum(0).mul_(a.gain)  # [out, Cc]
        if a.decoder is None:
            return d_zc, d_m.t().reshape(a.encoder.shape), None
        return d_zc, None, d_m.reshape(a.decoder.shape)
    weight = a.encoder if a.decoder is None else a.decoder
    grad = du3.view(n, w.out, h, wd) * a.gain
    d_zc, d_w = _conv_bwd(grad, zc.view(n, w.cc, h, wd), weight, w.kc // 2, a.decoder is None, True)
    d_zc = d_zc.reshape(n, w.cc, h * wd)
    return (d_zc, d_w, None) if a.decoder is None else (d_zc, None, d_w)


def _layer1_input_backward(
    dzc: Tensor, dzl: Tensor, a: BlockArgs, w: _Widths, need_dx: bool
) -> tuple[Optional[Tensor], Tensor, Tensor]:
    """(dx, d encoder, d learner1) through layer 1's convolutions."""
    x = a.x.contiguous()
    n, cin, h, wd = x.shape
    if w.kc == w.k:
        dx, d_cat = _conv_bwd(
            dzc.view(n, w.cc + w.hid, h, wd), x, torch.cat([a.encoder, a.learner1]), w.k // 2, False, need_dx
        )
        return dx, d_cat[: w.cc].clone(), d_cat[w.cc :].clone()
    dx, d_learn1 = _conv_bwd(dzl.view(n, w.hid, h, wd), x, a.learner1, w.k // 2, False, need_dx)
    if w.kc == 1:  # the coder's GEMM: its input gradient accumulates into dx in place
        if need_dx:
            enc2d = a.encoder.view(w.cc, cin)
            dx.view(n, cin, h * wd).baddbmm_(enc2d.t().unsqueeze(0).expand(n, -1, -1), dzc)
        d_enc = torch.bmm(dzc, x.view(n, cin, h * wd).transpose(1, 2)).sum(0).view(a.encoder.shape)
        return dx, d_enc, d_learn1
    dx_c, d_enc = _conv_bwd(dzc.view(n, w.cc, h, wd), x, a.encoder, w.kc // 2, False, need_dx)
    return (dx + dx_c if need_dx else None), d_enc, d_learn1


def _backward(dy: Tensor, params: BlockArgs, s: PlanarSaved, need_dx: bool) -> BlockGrads:
    a = weights_in_data_dtype(params)
    n, _, h, wd = a.x.shape
    w = _widths(a)
    c1 = w.cc + w.hid
    gc, bc, g1, b1, g2, b2 = affine_as(a, param_dtype(a.x.dtype))
    mean, invstd = s.mean, s.invstd

    dy3 = dy.contiguous().view(n, w.out, h * wd)
    du3 = torch.empty_like(s.u)
    sums2 = _dbn_act(dy3, (s.u, 0), du3, (mean[c1:], invstd[c1:]), (g2, b2), a.final_act, a)

    # recompute layer 1's normalised / activated halves instead of having stored them
    halves = layer1_halves(s.zc, s.zl, w.cc)
    zc, al = _layer1_apply(halves, w, mean[:c1], invstd[:c1], (gc, bc, g1, b1), a)
    d_al, d_learn2 = _conv_bwd(du3.view(n, w.out, h, wd), al.view(n, w.hid, h, wd), a.learner2, w.k // 2, False, True)
    d_zc, d_enc_decode, d_dec = _decoder_backward(du3, zc, a, w)

    # layer 1: dBN_c on the coder half, dAct + dBN_1 on the learner half, written beside each other
    (tc, _), (tl, _) = halves
    dzc = torch.empty_like(tc)
    dzl = dzc if tl is tc else torch.empty_like(tl)
    sums_c = _dbn_act(d_zc.contiguous(), halves[0], dzc, (mean[: w.cc], invstd[: w.cc]), (gc, bc), False, a)
    d_al3 = d_al.contiguous().view(n, w.hid, h * wd)
    sums_1 = _dbn_act(d_al3, halves[1], dzl, (mean[w.cc : c1], invstd[w.cc : c1]), (g1, b1), True, a)
    dx, d_enc, d_learn1 = _layer1_input_backward(dzc, dzl, a, w, need_dx)
    if d_enc_decode is not None:
        d_enc = d_enc + d_enc_decode
    as_param = params.encoder.dtype  # the weights' gradients in their own dtype (float32 under autocast)
    return BlockGrads(
        empty_unless(dx, a.x), d_enc.to(as_param), d_learn1.to(as_param), d_learn2.to(as_param),
        empty_unless(d_dec, a.x) if d_dec is None else d_dec.to(as_param),
        *bn_grads(sums_c, a.coder_gamma), *bn_grads(sums_1, a.learner_gamma), *bn_grads(sums2, a.out_gamma),
    )  # fmt: skip


def _fake_backward(dy: Tensor, a: BlockArgs, s: PlanarSaved, need_dx: bool) -> list[Tensor]:
    return grads_like(a, torch.empty_like(a.x) if need_dx else a.x.new_empty((0,)), dense=False)


conv_block_fused = BlockOp(
    "conv_block_fused",
    PlanarSaved,
    _forward,
    _backward,
    fake_forward=_fake_forward,
    fake_backward=_fake_backward,
    backend="cuda",
)
