"""The block's math rebuilt from a fused op's arguments with differentiable torch ops (eager's), for the one
thing the fused backwards cannot do: be differentiated again. A fused op's backward runs its kernels for
first-order gradients; under ``create_graph=True`` (gradient penalties, R1, WGAN-GP, MAML, Hessian-vector
products) it recomputes the block from what forward saved with these ops and differentiates that instead."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..activation import Activation
from ..block import BlockConfig, BlockNorms, BlockWeights, NormParams
from ..eager import conv_block_eager, linear_block_eager
from .contract import BlockArgs


def _activation(a: BlockArgs) -> Activation:
    if a.gelu:
        return Activation("gelu", scale=a.act_scale)
    return Activation("leaky_relu", negative_slope=a.slope, scale=a.act_scale)


def _norms(a: BlockArgs, dtype: torch.dtype) -> BlockNorms:
    """The three norms' parameters (and, in eval, running statistics) from the op's concatenated vectors."""
    widths = (a.encoder.shape[0], a.learner1.shape[0], a.learner2.shape[0])
    affine = [t.to(dtype) for t in a.affine]
    params: list[NormParams] = []
    start = 0
    for i, width in enumerate(widths):
        running: tuple[Optional[Tensor], Optional[Tensor]] = (None, None)
        if not a.use_batch and a.running_mean is not None and a.running_var is not None:
            running = (a.running_mean[start : start + width], a.running_var[start : start + width])
        params.append(NormParams(affine[2 * i], affine[2 * i + 1], *running))
        start += width
    return BlockNorms(*params)


def differentiable_block(a: BlockArgs) -> Tensor:
    """``y`` of the op's block, every step a differentiable torch op, in the data's dtype; batch statistics
    as the op used them (the running statistics are read, never updated)."""
    dtype = a.x.dtype
    cast = [None if t is None else t.to(dtype) for t in (a.encoder, a.learner1, a.learner2, a.decoder)]
    weights = BlockWeights(*cast)  # type: ignore[arg-type]
    conv = a.x.dim() == 4
    config = BlockConfig(_activation(a), "batch" if conv else "layer", a.final_act, a.eps)
    block = conv_block_eager if conv else linear_block_eager
    return block(a.x, weights, _norms(a, dtype), config, a.use_batch)
