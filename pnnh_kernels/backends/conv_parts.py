"""Pieces the fused conv ops share: the dtype of their statistics, statistics from the
running buffers, the contiguous copies the kernels take, and layer 1's two halves."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .contract import BlockArgs, grads_like
from .geometry import BlockGeometry


def param_dtype(dtype: torch.dtype) -> torch.dtype:
    """Norm statistics and affine parameters stay float32 for half/bf16 data (as cuDNN's batch norm keeps them)."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def running_stats(a: BlockArgs, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """(mean, invstd, var) of every channel from the running statistics (eval mode), in ``dtype``."""
    assert a.running_mean is not None and a.running_var is not None, "eval mode needs the running statistics"
    mean, var = a.running_mean, a.running_var
    return mean.to(dtype).contiguous(), torch.rsqrt(var.double() + a.eps).to(dtype), var.to(dtype, copy=True)


def weights_in_data_dtype(a: BlockArgs) -> BlockArgs:
    """``a`` with the four weights in the data's dtype: under autocast they arrive as float32 parameters
    beside low-precision data, and the library convolutions take one dtype."""
    dtype = a.x.dtype
    if a.encoder.dtype == dtype:
        return a
    return a._replace(
        encoder=a.encoder.to(dtype),
        learner1=a.learner1.to(dtype),
        learner2=a.learner2.to(dtype),
        decoder=None if a.decoder is None else a.decoder.to(dtype),
    )


def contiguous_as(dtype: torch.dtype, *tensors: Tensor) -> list[Tensor]:
    # the checks first: a no-op .to()/.contiguous() still costs a dispatch, and blocks are called often
    return [t if t.dtype == dtype and t.is_contiguous() else t.to(dtype).contiguous() for t in tensors]


def affine_as(a: BlockArgs, dtype: torch.dtype) -> list[Tensor]:
    """The six affine parameters (coder, learner, out), contiguous in ``dtype``."""
    return contiguous_as(dtype, *a.affine)


#: a half of layer 1: (tensor, channel offset of the half in it)
Half = tuple[Tensor, int]
Halves = tuple[Half, Half]
#: (mean, invstd) or (gamma, beta) of some channels
TensorPair = tuple[Tensor, Tensor]
#: (d zc, the decoder's share of d encoder (tied) or None, d decoder (untied) or None)
CoderGrads = tuple[Tensor, Optional[Tensor], Optional[Tensor]]


def layer1_halves(g: BlockGeometry, zc: Tensor, zl: Tensor) -> Halves:
    """(tensor, channel offset) of the coder and learner halves of layer 1: ``zc`` holds both when they
    are joint (one convolution computed them; ``zl`` is then empty)."""
    return ((zc, 0), (zc, g.cc)) if g.joint else ((zc, 0), (zl, 0))


def bn_grads(sums: Tensor, gamma: Tensor) -> tuple[Tensor, Tensor]:
    """(d gamma, d beta) from a dAct + dBN pass's [dbeta, dgamma] sums; copies: a custom op's outputs may
    not alias each other."""
    return sums[1].to(gamma.dtype, copy=True), sums[0].to(gamma.dtype, copy=True)


def empty_unless(t: Optional[Tensor], like: Tensor) -> Tensor:
    """``t``, or an empty tensor where a gradient is not computed (ops return tensors, never None)."""
    return t if t is not None else like.new_empty((0,))


def channels_last_grads_like(a: BlockArgs, need_dx: bool) -> list[Tensor]:
    """Empty gradients as the rows ops return them (dx channels_last, the rest dense), for their fakes."""
    x = a.x
    n, cin, h, w = x.shape
    dx = x.new_empty((n, h, w, cin)).permute(0, 3, 1, 2) if need_dx else x.new_empty((0,))
    return grads_like(a, dx, dense=True)
