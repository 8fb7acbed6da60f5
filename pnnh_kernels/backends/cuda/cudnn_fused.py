"""cuDNN's fused convolution graphs (csrc/cuda/cudnn_fused.cpp), from Python.

``conv_genstats`` runs ``y = conv(act(x * scale + bias), w)`` (or ``conv(x, w)`` without a prologue) with
the batch-norm statistics of ``y`` from the convolution's epilogue: the two patterns of a PNNH block's
layers. ``dgrad_drelu_dbn`` is their backward as cuDNN documents it for ResNet training: the input
gradient of the convolution, through the activation (against the recomputed BN-apply of the pre-norm
input), into batch norm's parameter gradients and the coefficients of the pre-norm input's gradient.
Half or bfloat16, channels_last, stride 1. ``support`` / ``dgrad_support`` say, per shape, whether cuDNN
has an engine (an empty string) or why not. They exist in builds made with the cudnn-frontend headers
(``pip install nvidia-cudnn-frontend`` before building); :func:`available` tells.

The ``cuda`` backend's op runs its forward convolutions through ``conv_genstats`` and layer 2's backward
through ``dgrad_drelu_dbn`` where ``support_on`` says yes (:mod:`.cudnn_layers`).
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


class DgradBn(NamedTuple):
    """The backward of ``conv(act(BN(x)), w)`` down to batch norm (batch statistics)."""

    d_act: Tensor  #: the BN output's gradient, dgrad(dy, w) * act'(BN(x)); x's dtype, channels_last
    dgamma: Tensor  #: float32 [C]
    dbeta: Tensor
    eq_scale_dy: Tensor  #: dx = eq_scale_dy * d_act + eq_scale_x * x + eq_bias (float32 [C] each)
    eq_scale_x: Tensor
    eq_bias: Tensor

    def dx(self, x: Tensor) -> Tensor:
        """The pre-norm input's gradient, in x's dtype (a reference pass: the op would fuse it)."""
        view = (1, -1, 1, 1)
        dx = self.eq_scale_dy.view(view) * self.d_act.float() + self.eq_scale_x.view(view) * x.float()
        return (dx + self.eq_bias.view(view)).to(x.dtype)


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


def support_on(
    device: torch.device,
    x_shape: tuple[int, ...],
    w_shape: tuple[int, ...],
    dtype: torch.dtype,
    *,
    prologue: bool,
    slope: float = 0.0,
    backward: bool = False,
) -> str:
    """:func:`support` (or :func:`dgrad_support` for the ``backward`` graph) for data on ``device``: '' only
    for CUDA float16/bfloat16, where cuDNN has an engine."""
    if device.type != "cuda":
        return "cuDNN's fused graphs run on CUDA tensors"
    if dtype not in (torch.float16, torch.bfloat16):
        return f"cuDNN's fused graphs take float16 or bfloat16 data, not {dtype}"
    x4, w4 = tuple(x_shape), tuple(w_shape)
    with torch.cuda.device(device):
        if backward:
            return dgrad_support(x4, w4, dtype, slope=slope)  # type: ignore[arg-type]
        return support(x4, w4, dtype, prologue=prologue, slope=slope)  # type: ignore[arg-type]


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


def dgrad_support(
    x_shape: tuple[int, int, int, int], w_shape: tuple[int, int, int, int], dtype: torch.dtype, *, slope: float = 0.0
) -> str:
    """'' when cuDNN can run dgrad -> dReLU -> BN backward weight for x [N, C, H, W] (the BN's pre-norm
    input) and w [K, C, R, R] on the current device, else the reason."""
    if not available():
        return "the extension was built without the cudnn-frontend headers"
    n, c, h, w = x_shape
    k, _, r, _ = w_shape
    return str(extension().cudnn_dgrad_support(n, c, h, w, k, r, r // 2, slope, dtype))


def dgrad_drelu_dbn(
    dy: Tensor,
    w: Tensor,
    x: Tensor,
    mean: Tensor,
    invstd: Tensor,
    gamma: Tensor,
    beta: Tensor,
    slope: float = 0.0,
) -> DgradBn:
    """The backward of ``y = conv(act(BN(x)), w)`` ('same' padding, stride 1, batch statistics ``mean`` /
    ``invstd`` of x) from ``dy``, down to batch norm, in one cuDNN graph. Raises with cuDNN's reason where
    it has no engine."""
    if not available():
        raise RuntimeError("pnnh_kernels was built without the cudnn-frontend headers (nvidia-cudnn-frontend)")
    out = extension().cudnn_dgrad_drelu_dbn(dy, w, x, mean, invstd, gamma, beta, float(slope), w.shape[-1] // 2)
    return DgradBn(*out)
