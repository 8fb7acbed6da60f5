"""cuDNN's fused convolution graphs (csrc/cuda/cudnn_fused.cpp), from Python.

``conv_genstats`` runs ``y = conv(act(x * scale + bias), w)`` (or ``conv(x, w)`` without a prologue) with
the batch-norm statistics of ``y`` from the convolution's epilogue: the two patterns of a PNNH block's
layers. Half or bfloat16, channels_last, stride 1. ``support`` says, per shape, whether cuDNN has an engine
for it (an empty string) or why not. They exist in builds made with the cudnn-frontend headers
(``pip install nvidia-cudnn-frontend`` before building); :func:`available` tells.

Not yet wired into the ``cuda`` backend's op: the GPU probe (benchmarks/cudnn_probe.py) measures first
which patterns cuDNN fuses at the models' shapes and what that saves.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from ..._extension import extension


class ConvStats(NamedTuple):
    y: Tensor  #: the convolution's output, x's dtype, channels_last
    sum: Tensor  #: per output channel, float32
    sq_sum: Tensor


def available() -> bool:
    ext = extension()
    return ext is not None and bool(getattr(ext, "with_cudnn_frontend", False))


def support(
    x_shape: tuple[int, int, int, int],
    w_shape: tuple[int, int, int, int],
    dtype: torch.dtype,
    *,
    prologue: bool,
    slope: float = 0.0,
) -> str:
    """'' when cuDNN can run the graph for these shapes on the current device, else the reason."""
    if not available():
        return "the extension was built without the cudnn-frontend headers"
    n, c, h, w = x_shape
    k, _, r, _ = w_shape
    return str(extension().cudnn_fused_support(n, c, h, w, k, r, r // 2, prologue, slope, dtype))


def conv_genstats(
    x: Tensor, w: Tensor, scale: Optional[Tensor] = None, bias: Optional[Tensor] = None, slope: float = 0.0
) -> ConvStats:
    """'same'-padded stride-1 convolution of ``act(x * scale + bias)`` (``scale``/``bias`` given) or of ``x``,
    with its per-channel sum and sum of squares. Raises with cuDNN's reason where it has no engine."""
    if not available():
        raise RuntimeError("pnnh_kernels was built without the cudnn-frontend headers (nvidia-cudnn-frontend)")
    if (scale is None) != (bias is None):
        raise ValueError("give both scale and bias (the batch-norm apply), or neither")
    prologue = scale is not None
    empty = x.new_empty(0, dtype=torch.float32)
    y, s, sq = extension().cudnn_conv_genstats(
        x, w, scale if prologue else empty, bias if prologue else empty, prologue, float(slope), w.shape[-1] // 2
    )
    return ConvStats(y, s, sq)
