"""PNNHConv2d of the 'cuda' backend: fused passes around library convolutions, in the input's layout
(``pnnh::conv_block_cuda`` and its backward, :mod:`..contract`'s signatures; layouts: :mod:`.maps`).

Forward: layer 1 is one convolution through ``[W_e; W_1]`` when the kernels agree, else the learner's
convolution beside the 1x1 coder's GEMM; per tensor one reduction pass writes per-split partial sums
(no zeroing launch, no atomics) and one launch finalises them into the block's [3, C] statistics
(mean, invstd, unbiased variance) at the layer's columns; one pass each writes the normalised coder
half and the activated learner half (never the signed copies); layer 2 is one convolution for the
learner, into whose output the decoder GEMM accumulates in place; then its statistics and one BN +
activation pass. On channels_last half data cuDNN's fused graphs take over layer 1's learner statistics
and layer 2's learner BN-apply where they can (:mod:`.cudnn_layers`). Only the pre-norm outputs are
saved; backward recomputes the normalised tensors and fuses dReLU into dBN (per layer one reduction
pass, and one apply pass that also writes the BN parameters' gradients).

The convolutions are cuDNN's / cuBLAS's; the passes between them are the extension's CUDA kernels.
A channels_last input keeps every map channels_last, an NCHW one NCHW: no layout copy inside the block,
and the output leaves in the input's layout. The test-only C++ versions of its passes run the same op on CPU
tensors, which is how the tests check this module without a GPU (the 'cpu' backend itself runs
:mod:`..cpu.conv`).
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
    empty_unless,
    layer1_halves,
    param_dtype,
    running_stats,
    weights_in_data_dtype,
)
from . import cudnn_layers
from .cudnn_layers import FusionPlan
from .maps import FeatureMaps


class ConvSaved(NamedTuple):
    """What forward keeps for backward, maps as [outer, C, inner] (:mod:`.maps`). ``zc``/``zl`` are layer 1's
    pre-norm halves; when coder and learner kernels agree one convolution computed them and ``zc`` holds
    both (``zl`` empty)."""

    zc: Tensor
    zl: Tensor
    u: Tensor  #: layer 2's pre-norm output
    stats: Tensor  #: [3, Cc + H + Cout]: mean, invstd and the unbiased batch variance (for the running statistics)
    #: under autocast, the four weights as forward cast them to the data's dtype (backward reuses the casts);
    #: else empty
    encoder_cast: Tensor
    learner1_cast: Tensor
    learner2_cast: Tensor
    decoder_cast: Tensor

    @property
    def mean(self) -> Tensor:
        return self.stats[0]

    @property
    def invstd(self) -> Tensor:
        return self.stats[1]

    @property
    def var(self) -> Tensor:
        return self.stats[2]


def _finalize(stats: Tensor, col: int, sums: Tensor, z3: Tensor, eps: float) -> None:
    """Writes (mean, invstd, unbiased var) of channels [col, col + C) of ``stats`` from the [2, C] sums over
    the map ``z3``'s pixels: one launch."""
    extension().bn_finalize(sums, float(z3.shape[0] * z3.shape[2]), eps, stats, col)


def _batch_stats(stats: Tensor, col: int, z3: Tensor, c0: int, cn: int, eps: float) -> None:
    """The batch statistics of ``z3``'s channels [c0, c0 + cn) into ``stats`` at ``col``: one fused
    reduction pass (float64 sums) and the finalize."""
    _finalize(stats, col, extension().channel_sums(z3, c0, cn), z3, eps)


def _conv(maps: FeatureMaps, t3: Tensor, weight: Tensor, transposed: bool = False) -> Tensor:
    """A 'same'-padded stride-1 convolution of a map, as a map."""
    conv = F.conv_transpose2d if transposed else F.conv2d
    return maps.flat(conv(maps.image(t3), weight, padding=weight.shape[-1] // 2))


def _layer1_weight(a: BlockArgs, maps: FeatureMaps) -> Tensor:
    """The learner's layer-1 kernel, or ``[W_e; W_1]`` when coder and learner kernels agree (one
    convolution computes both halves)."""
    return torch.cat([a.encoder, a.learner1]) if maps.joint else a.learner1


def _layer1_conv(
    maps: FeatureMaps, x3: Tensor, a: BlockArgs, weight: Tensor, fused: bool
) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """Layer 1's pre-norm outputs (zc, zl) and, from cuDNN's epilogue when ``fused``, the sums of the
    convolution with ``weight`` (:func:`_layer1_weight`). With one joint convolution zc holds both halves
    and zl is empty; else the 1x1 coder is a GEMM over x beside the learner's convolution."""
    conv, sums = (_conv(maps, x3, weight), None) if not fused else cudnn_layers.conv_with_sums(maps, x3, weight)
    enc = a.encoder
    if maps.joint:
        return conv, x3.new_empty((0,)), sums
    zc = maps.linear(enc.view(maps.cc, -1), x3) if maps.kc == 1 else _conv(maps, x3, enc)
    return zc, conv, sums


def _apply_half(
    maps: FeatureMaps, half: Half, stats: TensorPair, gamma_beta: TensorPair, act: bool, a: BlockArgs
) -> Tensor:
    """BN-apply (+ the activation) of one half of layer 1 into a map of its own, one pass."""
    (t, c0), (mean, invstd), (gamma, beta) = half, stats, gamma_beta
    out = maps.new(t, mean.shape[0])
    extension().bn_act_apply(t, c0, out, mean, invstd, gamma, beta, act, a.slope, a.act_scale)
    return out


def _layer1_apply(
    maps: FeatureMaps, halves: Halves, stats: TensorPair, affine: Sequence[Tensor], a: BlockArgs
) -> tuple[Tensor, Tensor]:
    """Normalised coder half and activated learner half of layer 1, one pass each."""
    cc, (mean, invstd), (gc, bc, g1, b1) = maps.cc, stats, affine[:4]
    zc = _apply_half(maps, halves[0], (mean[:cc], invstd[:cc]), (gc, bc), False, a)
    al = _apply_half(maps, halves[1], (mean[cc:], invstd[cc:]), (g1, b1), True, a)
    return zc, al


def _decoder_matrix(enc: Tensor, dec: Optional[Tensor]) -> Tensor:
    """M with ``decode(z) = M @ z`` for 1x1 coders: [out, Cc]."""
    return enc[:, :, 0, 0].t() if dec is None else dec[:, :, 0, 0]


def _conv_bwd(
    maps: FeatureMaps, grad: Tensor, inp: Tensor, weight: Tensor, transposed: bool, need_input: bool
) -> tuple[Any, Tensor]:
    """(input gradient as a map, None unless ``need_input``; weight gradient) of a 'same'-padded stride-1
    convolution of the map ``inp``."""
    pad = weight.shape[-1] // 2
    d_in, d_w, _ = torch.ops.aten.convolution_backward(
        maps.image(grad), maps.image(inp), weight, None, [1, 1], [pad, pad], [1, 1], transposed, [0, 0], 1,
        [need_input, True, False],
    )  # fmt: skip
    return (maps.flat(d_in) if need_input else None), d_w


# --------------------------------------------------------------------------- forward


def _layer1_batch_stats(
    stats: Tensor, a: BlockArgs, maps: FeatureMaps, halves: Halves, conv_sums: Optional[Tensor]
) -> None:
    """Layer 1's statistics into ``stats``: from cuDNN's epilogue sums where it computed them (both halves
    with one joint convolution, else the learner's), the fused reduction pass for the rest."""
    (tc, oc), (tl, ol) = halves
    if conv_sums is not None and maps.joint:
        _finalize(stats, 0, conv_sums, tc, a.eps)
        return
    _batch_stats(stats, 0, tc, oc, maps.cc, a.eps)
    if conv_sums is None:
        _batch_stats(stats, maps.cc, tl, ol, maps.hid, a.eps)
    else:
        _finalize(stats, maps.cc, conv_sums, tl, a.eps)


def _decode_into(maps: FeatureMaps, u: Tensor, zc: Tensor, a: BlockArgs) -> None:
    """u += gain * decode(zc): for a 1x1 coder the decoder GEMM accumulates into the learner's output
    (no separate add pass)."""
    if maps.kc == 1:
        maps.linear_add_(u, _decoder_matrix(a.encoder, a.decoder), zc, alpha=a.gain)
    elif a.decoder is None:
        u.add_(_conv(maps, zc, a.encoder, transposed=True), alpha=a.gain)
    else:
        u.add_(_conv(maps, zc, a.decoder), alpha=a.gain)


def _layer1_forward(
    maps: FeatureMaps, x3: Tensor, a: BlockArgs, plan: FusionPlan, weight: Tensor, stats: Tensor
) -> tuple[Tensor, Tensor]:
    """Layer 1's pre-norm outputs (zc, zl as saved; ``weight``: :func:`_layer1_weight`); in training their
    statistics into ``stats``."""
    zc_pre, zl_pre, conv_sums = _layer1_conv(maps, x3, a, weight, plan.layer1_stats)
    if a.use_batch:
        _layer1_batch_stats(stats, a, maps, layer1_halves(maps, zc_pre, zl_pre), conv_sums)
    return zc_pre, zl_pre


def _layer2_forward(
    maps: FeatureMaps, halves: Halves, stats: TensorPair, affine: Sequence[Tensor], a: BlockArgs, plan: FusionPlan
) -> Tensor:
    """u = conv(act(BN_1(zl)), W_2) + gain * decode(BN_c(zc)): the learner's BN-apply + activation in
    cuDNN's prologue when ``plan`` says so, else its own pass."""
    (mean, invstd), (gc, bc, g1, b1) = stats, affine[:4]
    if plan.layer2_prologue:
        zc = _apply_half(maps, halves[0], (mean[: maps.cc], invstd[: maps.cc]), (gc, bc), False, a)
        learner = (mean[maps.cc :], invstd[maps.cc :], g1, b1)
        u = cudnn_layers.conv_of_bn_act(maps, halves[1][0], a.learner2, *learner, a)
    else:
        zc, al = _layer1_apply(maps, halves, stats, affine, a)
        u = _conv(maps, al, a.learner2)
    _decode_into(maps, u, zc, a)
    return u


def _weight_casts(a: BlockArgs, cast: BlockArgs) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The record's four weight casts: ``cast``'s weights where they differ from ``a``'s, else empties."""
    if cast.encoder is a.encoder:  # (distinct empties: a custom op's outputs may not alias each other)
        return a.x.new_empty((0,)), a.x.new_empty((0,)), a.x.new_empty((0,)), a.x.new_empty((0,))
    return cast.encoder, cast.learner1, cast.learner2, a.x.new_empty((0,)) if cast.decoder is None else cast.decoder


def _with_forward_casts(a: BlockArgs, s: ConvSaved) -> BlockArgs:
    """``a`` with the weights forward used (its casts under autocast, else ``a``'s own)."""
    if s.encoder_cast.numel() == 0:
        return a
    decoder = None if a.decoder is None else s.decoder_cast
    return a._replace(encoder=s.encoder_cast, learner1=s.learner1_cast, learner2=s.learner2_cast, decoder=decoder)


def _forward(params: BlockArgs) -> tuple[Tensor, ConvSaved]:
    a = weights_in_data_dtype(params)
    maps = FeatureMaps(a)
    x3 = maps.flat(a.x)
    c1 = maps.c1
    pdtype = param_dtype(x3.dtype)
    affine = affine_as(a, pdtype)
    if a.use_batch:
        stats = x3.new_empty((3, maps.channels), dtype=pdtype)
    else:
        stats = torch.stack(running_stats(a, pdtype))
    weight1 = _layer1_weight(a, maps)
    plan = cudnn_layers.plan_fusion(a, maps, tuple(weight1.shape))
    zc_pre, zl_pre = _layer1_forward(maps, x3, a, plan, weight1, stats)
    u = _layer2_forward(maps, layer1_halves(maps, zc_pre, zl_pre), (stats[0, :c1], stats[1, :c1]), affine, a, plan)
    if a.use_batch:
        _batch_stats(stats, c1, u, 0, maps.out, a.eps)
    y = torch.empty_like(u)
    mean2, inv2 = stats[0, c1:], stats[1, c1:]
    extension().bn_act_apply(u, 0, y, mean2, inv2, affine[4], affine[5], a.final_act, a.slope, a.act_scale)
    return maps.image(y), ConvSaved(zc_pre, zl_pre, u, stats, *_weight_casts(params, a))


def _fake_forward(a: BlockArgs) -> tuple[Tensor, ConvSaved]:
    maps, x = FeatureMaps(a), a.x
    saved = ConvSaved(
        maps.new(x, maps.c1 if maps.joint else maps.cc),
        x.new_empty((0,)) if maps.joint else maps.new(x, maps.hid),
        maps.new(x, maps.out),
        x.new_empty((3, maps.channels), dtype=param_dtype(x.dtype)),
        *_fake_weight_casts(a),
    )
    return maps.image(maps.new(x, maps.out)), saved


def _fake_weight_casts(a: BlockArgs) -> list[Tensor]:
    if a.encoder.dtype == a.x.dtype:
        return [a.x.new_empty((0,)) for _ in range(4)]
    weights = (a.encoder, a.learner1, a.learner2, a.decoder)
    return [a.x.new_empty((0,)) if t is None else torch.empty_like(t, dtype=a.x.dtype) for t in weights]


# --------------------------------------------------------------------------- backward


def _dbn_act(
    dy3: Tensor, half: Half, out: Tensor, stats: TensorPair, gamma_beta: TensorPair, use_act: bool, a: BlockArgs
) -> TensorPair:
    """dAct + dBN of one half in two fused passes, written into ``out``; returns (d gamma, d beta), which the
    apply pass writes from the reduction's sums, in the norm's parameter dtype."""
    (t, c0), (mean, invstd), (gamma, beta) = half, stats, gamma_beta
    C = extension()
    sums = C.bn_act_backward_sums(dy3, t, c0, mean, invstd, gamma, beta, use_act, a.slope, a.act_scale)
    dgamma, dbeta = C.bn_act_backward_apply(
        dy3, t, c0, out, mean, invstd, gamma, beta, sums, a.use_batch, use_act, a.slope, a.act_scale
    )
    return dgamma, dbeta


def _decoder_backward(maps: FeatureMaps, du: Tensor, zc: Tensor, a: BlockArgs) -> CoderGrads:
    """(d zc, the decoder's share of d encoder, d decoder) through ``u += gain * decode(zc)``; the gain is
    the GEMMs' alpha."""
    if maps.kc == 1:
        d_zc = maps.linear(_decoder_matrix(a.encoder, a.decoder).t(), du, alpha=a.gain)
        if a.decoder is None:  # d(M^T) = gain * sum zc du^T, already the encoder's [Cc, Cin] shape
            return d_zc, maps.outer_sum(zc, du, alpha=a.gain), None
        return d_zc, None, maps.outer_sum(du, zc, alpha=a.gain).view(a.decoder.shape)
    weight = a.encoder if a.decoder is None else a.decoder
    d_zc, d_w = _conv_bwd(maps, du * a.gain, zc, weight, a.decoder is None, True)
    return (d_zc, d_w, None) if a.decoder is None else (d_zc, None, d_w)


def _learner_backward(
    maps: FeatureMaps, du: Tensor, half: Half, al: Tensor, dzl: Tensor, stats: TensorPair, gamma_beta: TensorPair,
    a: BlockArgs, fused: bool,
) -> tuple[Tensor, TensorPair]:  # fmt: skip
    """(d learner2, (d gamma_1, d beta_1)) through layer 2's convolution, the activation and BN_1, the
    learner's pre-norm gradient written into ``dzl``: cuDNN's dgrad -> dAct -> dBN graph and one pass for
    the input-gradient coefficients when ``fused``, else the library's dgrad and the two fused passes."""
    if not fused:
        d_al, d_learn2 = _conv_bwd(maps, du, al, a.learner2, False, True)
        return d_learn2, _dbn_act(d_al, half, dzl, stats, gamma_beta, True, a)
    _, d_learn2 = _conv_bwd(maps, du, al, a.learner2, False, False)
    g = cudnn_layers.dgrad_of_bn_act(maps, du, a.learner2, half[0], *stats, *gamma_beta, a)
    extension().bn_input_grad(g.d_act, half[0], half[1], dzl, g.eq_scale_dy, g.eq_scale_x, g.eq_bias)
    return d_learn2, (g.dgamma, g.dbeta)


def _layer1_input_backward(
    maps: FeatureMaps, dzc: Tensor, dzl: Tensor, a: BlockArgs, need_dx: bool, d_enc: Optional[Tensor]
) -> tuple[Optional[Tensor], Tensor, Tensor]:
    """(dx as a map, d encoder, d learner1) through layer 1's convolutions; ``d_enc``, the decoder's share
    of a tied encoder's gradient, is added to."""
    x3 = maps.flat(a.x)
    if maps.joint:
        dx, d_cat = _conv_bwd(maps, dzc, x3, torch.cat([a.encoder, a.learner1]), False, need_dx)
        d_own = d_cat[: maps.cc]
        return dx, (d_own.clone() if d_enc is None else d_enc.view(d_own.shape).add_(d_own)), d_cat[maps.cc :].clone()
    dx, d_learn1 = _conv_bwd(maps, dzl, x3, a.learner1, False, need_dx)
    if maps.kc == 1:  # the coder's GEMM: its input gradient accumulates into dx in place
        enc2d = a.encoder.view(maps.cc, -1)
        if dx is not None:
            maps.linear_add_(dx, enc2d.t(), dzc)
        if d_enc is None:
            return dx, maps.outer_sum(dzc, x3).view(a.encoder.shape), d_learn1
        maps.outer_sum_add_(d_enc.view(maps.cc, -1), dzc, x3)
        return dx, d_enc.view(a.encoder.shape), d_learn1
    dx_c, d_own = _conv_bwd(maps, dzc, x3, a.encoder, False, need_dx)
    return (dx + dx_c if dx is not None else None), (d_own if d_enc is None else d_enc.add_(d_own)), d_learn1


def _backward(dy: Tensor, params: BlockArgs, s: ConvSaved, need_dx: bool) -> BlockGrads:
    a = _with_forward_casts(params, s)
    maps = _saved_maps(a, s)
    c1 = maps.c1
    gc, bc, g1, b1, g2, b2 = affine_as(a, param_dtype(a.x.dtype))
    mean, invstd = s.mean, s.invstd

    du = torch.empty_like(s.u)
    grads2 = _dbn_act(maps.flat(dy), (s.u, 0), du, (mean[c1:], invstd[c1:]), (g2, b2), a.final_act, a)

    # recompute layer 1's normalised / activated halves instead of having stored them
    halves = layer1_halves(maps, s.zc, s.zl)
    zc, al = _layer1_apply(maps, halves, (mean[:c1], invstd[:c1]), (gc, bc, g1, b1), a)
    d_zc, d_enc_decode, d_dec = _decoder_backward(maps, du, zc, a)

    # layer 1: dBN_c on the coder half, dAct + dBN_1 on the learner half, written beside each other
    dzc = torch.empty_like(halves[0][0])
    dzl = dzc if maps.joint else torch.empty_like(halves[1][0])
    grads_c = _dbn_act(d_zc, halves[0], dzc, (mean[: maps.cc], invstd[: maps.cc]), (gc, bc), False, a)
    fused = cudnn_layers.fuses_layer2_backward(a, maps)
    learner = (mean[maps.cc : c1], invstd[maps.cc : c1]), (g1, b1)
    d_learn2, grads_1 = _learner_backward(maps, du, halves[1], al, dzl, *learner, a, fused)
    dx, d_enc, d_learn1 = _layer1_input_backward(maps, dzc, dzl, a, need_dx, d_enc_decode)
    as_param = params.encoder.dtype  # the weights' gradients in their own dtype (float32 under autocast)
    return BlockGrads(
        empty_unless(None if dx is None else maps.image(dx), a.x), d_enc.to(as_param), d_learn1.to(as_param),
        d_learn2.to(as_param), empty_unless(d_dec, a.x) if d_dec is None else d_dec.to(as_param),
        *_as_params(grads_c, a.coder_gamma), *_as_params(grads_1, a.learner_gamma), *_as_params(grads2, a.out_gamma),
    )  # fmt: skip


def _as_params(grads: TensorPair, gamma: Tensor) -> TensorPair:
    """The norm's (d gamma, d beta) in its parameters' dtype (a conversion only for a half-precision module)."""
    return grads[0].to(gamma.dtype), grads[1].to(gamma.dtype)


def _saved_maps(a: BlockArgs, s: ConvSaved) -> FeatureMaps:
    """The layout forward chose, read off its saved ``u`` (backward's x may have been restrided by a
    compiler; with one pixel per image both readings are the same memory)."""
    return FeatureMaps(a, channels_last=s.u.shape[2] == 1)


def _fake_backward(dy: Tensor, a: BlockArgs, s: ConvSaved, need_dx: bool) -> list[Tensor]:
    maps = _saved_maps(a, s)
    dx = maps.image(maps.new(a.x, a.x.shape[1])) if need_dx else a.x.new_empty((0,))
    return grads_like(a, dx, dense=False)


conv_block = BlockOp(
    "conv_block_cuda",
    ConvSaved,
    _forward,
    _backward,
    fake_forward=_fake_forward,
    fake_backward=_fake_backward,
)
