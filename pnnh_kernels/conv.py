"""PNNHConv2d: the PNNH block as a drop-in for a stride-1 ResNet basic block."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ._block_module import PNNHBlockBase
from .activation import ActivationLike
from .block import NORMS_CONV, DeviceLike
from .coder import PNNHCoder
from .functional import pnnh_conv2d


class PNNHConv2d(PNNHBlockBase):
    """Two plain conv-norm-act layers with a weight-sharing coder and a learner; no residual addition.

    Input and output are ``(N, C, H, W)`` with the same ``H, W`` (stride 1, 'same' padding), so it
    replaces a stride-1 basic block. ``coder=`` shares one :class:`PNNHCoder` across blocks.

    Args:
        in_channels, out_channels: block input and output channels (``out`` defaults to ``in``).
        kernel_size: learner kernel (odd).
        hidden_channels: learner width (defaults to ``out_channels``, as in a basic block).
        coder_channels, coder_kernel_size: coder width (default ``in_channels``) and kernel (default 1).
        activation: ``"relu"``, ``"leaky_relu"``, ``"identity"`` or an :class:`Activation`;
            ``negative_slope`` and ``activation_scale`` configure it (TAT uses both).
        final_activation: apply the activation after the last norm (True in a ResNet block).
        norm: ``"batch"`` or ``"none"``. ``bias`` defaults to ``norm == "none"``.
        tied: decode with the encoder's adjoint (needs ``in == out``); ``False`` learns a decoder.
        backend: ``"auto"``, ``"reference"``, ``"eager"`` or a fused backend when built.
    """

    _functional = staticmethod(pnnh_conv2d)

    def __init__(
        self,
        in_channels: int,
        out_channels: Optional[int] = None,
        kernel_size: int = 3,
        *,
        hidden_channels: Optional[int] = None,
        coder_channels: Optional[int] = None,
        coder_kernel_size: int = 1,
        activation: ActivationLike = "relu",
        negative_slope: Optional[float] = None,
        activation_scale: float = 1.0,
        final_activation: bool = True,
        norm: str = "batch",
        bias: Optional[bool] = None,
        tied: bool = True,
        coder: Optional[PNNHCoder] = None,
        eps: float = 1e-5,
        momentum: float = 0.1,
        backend: str = "auto",
        device: DeviceLike = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        for name, k in (("kernel_size", kernel_size), ("coder_kernel_size", coder_kernel_size)):
            if not isinstance(k, int) or k < 1 or k % 2 == 0:
                raise ValueError(f"{name} must be a positive odd int ('same' padding), got {k!r}")
        if norm not in NORMS_CONV:
            raise ValueError(f"PNNHConv2d norm must be one of {NORMS_CONV}, got {norm!r}")
        super().__init__(
            in_channels,
            out_channels,
            hidden_channels,
            coder_channels,
            (kernel_size, kernel_size),
            coder_kernel_size,
            activation=activation,
            negative_slope=negative_slope,
            activation_scale=activation_scale,
            final_activation=final_activation,
            norm=norm,
            bias=bias,
            tied=tied,
            coder=coder,
            eps=eps,
            momentum=momentum,
            backend=backend,
            make_norm=lambda c: nn.BatchNorm2d(c, eps=eps, momentum=momentum),
            device=device,
            dtype=dtype,
        )
        self.kernel_size = kernel_size
