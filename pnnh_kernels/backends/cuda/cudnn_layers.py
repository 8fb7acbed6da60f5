"""The 'cuda' op's convolutions as cuDNN fused graphs (:mod:`.cudnn_fused`), where cuDNN has an engine.

The block's layer patterns that cuDNN fuses for ResNet training:

- layer 1: ``z = conv(x)`` with its batch statistics in the convolution's epilogue (training), which
  removes the statistics pass over the learner's (or, with one joint convolution, both halves') output;
  for float16 data only: the epilogue sums squares in float32, which bfloat16's range overflows (the
  statistics must not, docs/RELIABILITY.md);
- layer 2: ``conv(act(BN_1(z_l)))`` with the learner's BN-apply + activation in the convolution's
  prologue, which removes the pass that wrote the activated learner half (forward never stores it). It
  needs the learner half in its own tensor (coder and learner kernels differ) and a positive activation
  scale (``scale * lrelu(v) = lrelu(scale * v)`` folds into the BN affine). Layer 2's own statistics
  cannot come from its epilogue: the decoder adds into its output first;
- layer 2's backward (training): dgrad -> dAct against the recomputed BN_1-apply -> BN_1's backward
  weight in one graph, then one pass for the learner's pre-norm gradient from the graph's coefficients
  (the library dgrad, the dBN reduction pass and its apply pass before). The weight gradient stays the
  library's.

Per call, :func:`plan_fusion` (forward) and :func:`fuses_layer2_backward` (backward) ask
:func:`.cudnn_fused.support_on` (CUDA, float16/bfloat16, channels_last maps, cuDNN's ``check_support`` at
that shape; graphs cached per shape); what they refuse
runs the op's separate passes, with the same results up to rounding. ``PNNH_CUDNN_FUSION=0`` or
:func:`set_cudnn_fusion` turns the graphs off (to compare, or to rule them out).
"""

from __future__ import annotations

import os
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from ..contract import BlockArgs
from . import cudnn_fused
from .maps import FeatureMaps

_enabled: Optional[bool] = None


def set_cudnn_fusion(enabled: Optional[bool]) -> None:
    """Use cuDNN's fused graphs where they are supported (True), never (False), or as
    ``PNNH_CUDNN_FUSION`` says (None; on unless it is ``0``)."""
    global _enabled
    _enabled = enabled


def cudnn_fusion_enabled() -> bool:
    if _enabled is not None:
        return _enabled
    return os.environ.get("PNNH_CUDNN_FUSION", "1") != "0"


class FusionPlan(NamedTuple):
    """Which of a call's forward convolutions run as cuDNN graphs."""

    layer1_stats: bool  #: layer 1's learner (or joint) convolution with its statistics epilogue
    layer2_prologue: bool  #: layer 2's convolution with the learner's BN-apply + activation prologue


NO_FUSION = FusionPlan(False, False)


def _cl(weight: Tensor) -> Tensor:
    return weight.contiguous(memory_format=torch.channels_last)


def plan_fusion(a: BlockArgs, maps: FeatureMaps, layer1_shape: tuple[int, ...]) -> FusionPlan:
    """What cuDNN fuses of this call's forward (``layer1_shape``: the learner's layer-1 kernel, or the joint
    ``[W_e; W_1]`` when the kernels agree)."""
    if not cudnn_fusion_enabled() or not maps.channels_last:
        return NO_FUSION
    x = a.x
    # the epilogue sums in float32: safe for float16 data (|v| <= 65504), not for bfloat16's float32 range
    layer1 = a.use_batch and x.dtype != torch.bfloat16 and _supported(x, tuple(x.shape), layer1_shape, False, 0.0)
    return FusionPlan(layer1, _learner_fuses(a, maps) and _supported(x, *_layer2_shapes(a, maps), True, a.slope))


def fuses_layer2_backward(a: BlockArgs, maps: FeatureMaps) -> bool:
    """Whether layer 2's backward runs as cuDNN's dgrad -> dAct -> BN_1 backward-weight graph (training)."""
    if not cudnn_fusion_enabled() or not maps.channels_last or not (a.use_batch and _learner_fuses(a, maps)):
        return False
    return _supported(a.x, *_layer2_shapes(a, maps), True, a.slope, backward=True)


def _learner_fuses(a: BlockArgs, maps: FeatureMaps) -> bool:
    """The learner's BN_1 + activation around layer 2 can join its graphs: a tensor of its own (layer 1's
    halves are not joint), a scale that folds into BN_1."""
    return not maps.joint and a.act_scale > 0


def _layer2_shapes(a: BlockArgs, maps: FeatureMaps) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(layer 2's input: the learner's pre-norm map, its kernel) shapes."""
    w2 = tuple(a.learner2.shape)
    return (maps.n, w2[1], maps.h, maps.w), w2


def _supported(
    x: Tensor, in_shape: tuple, w_shape: tuple, prologue: bool, slope: float, backward: bool = False
) -> bool:
    reason = cudnn_fused.support_on(
        x.device, in_shape, w_shape, x.dtype, prologue=prologue, slope=slope, backward=backward
    )
    return reason == ""


def conv_with_sums(maps: FeatureMaps, x3: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    """(``conv(x)`` as a map, its per-channel [sum, sum of squares] as [2, C]) in one graph."""
    out = cudnn_fused.conv_genstats(maps.image(x3), _cl(weight))
    return maps.flat(out.y), torch.stack([out.sum, out.sq_sum])


def conv_of_bn_act(
    maps: FeatureMaps, z3: Tensor, weight: Tensor, mean: Tensor, invstd: Tensor, gamma: Tensor, beta: Tensor,
    a: BlockArgs,
) -> Tensor:  # fmt: skip
    """``conv(act(BN(z)))`` as a map, the BN-apply + activation in the convolution's prologue
    (``act = scale * lrelu`` with ``scale > 0`` folded into its affine)."""
    mul = gamma * invstd * a.act_scale  # float32 for half data (the graph's scale and bias are float32)
    add = beta * a.act_scale - mean * mul
    out = cudnn_fused.conv_genstats(maps.image(z3), _cl(weight), mul, add, a.slope)
    return maps.flat(out.y)


def dgrad_of_bn_act(
    maps: FeatureMaps, du3: Tensor, weight: Tensor, z3: Tensor, mean: Tensor, invstd: Tensor, gamma: Tensor,
    beta: Tensor, a: BlockArgs,
) -> cudnn_fused.DgradBn:  # fmt: skip
    """The backward of ``u = conv(act(BN(z)))`` (batch statistics) from ``du``, in one cuDNN graph: ``d_act``
    as a map, BN's (d gamma, d beta) and the coefficients of z's gradient. ``act = scale * lrelu`` folds
    into the BN affine as in :func:`conv_of_bn_act`, so the graph's parameter gradients are scaled back."""
    folded = a.act_scale != 1.0
    g = cudnn_fused.dgrad_drelu_dbn(
        maps.image(du3), _cl(weight), maps.image(z3), mean, invstd,
        gamma * a.act_scale if folded else gamma, beta * a.act_scale if folded else beta, a.slope,
    )  # fmt: skip
    if folded:
        g = g._replace(dgamma=g.dgamma * a.act_scale, dbeta=g.dbeta * a.act_scale)
    return g._replace(d_act=maps.flat(g.d_act))
