"""PNNHConv2d: the PNNH block as a drop-in for a stride-1 ResNet basic block."""

from __future__ import annotations

from typing import Optional

from torch import nn
from typing_extensions import Unpack

from ._block_module import BlockOptions, PNNHBlockBase
from .block import NORMS_CONV
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
        coder: a :class:`PNNHCoder` to share (its widths and kernel must fit this block).
        eps, momentum: the norms' (as ``torch.nn.BatchNorm2d``).
        backend: ``"auto"``, ``"reference"``, ``"eager"`` or a fused backend when built.
        device, dtype: of the parameters and buffers.

    The options from ``activation`` on are :class:`~pnnh_kernels._block_module.BlockOptions`, shared with
    :class:`PNNHLinear`.
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
        norm: str = "batch",
        **options: Unpack[BlockOptions],
    ) -> None:
        for name, k in (("kernel_size", kernel_size), ("coder_kernel_size", coder_kernel_size)):
            if not isinstance(k, int) or k < 1 or k % 2 == 0:
                raise ValueError(f"{name} must be a positive odd int ('same' padding), got {k!r}")
        if norm not in NORMS_CONV:
            raise ValueError(f"PNNHConv2d norm must be one of {NORMS_CONV}, got {norm!r}")
        learner_kernel = (kernel_size, kernel_size)
        super().__init__(
            in_channels, out_channels, hidden_channels, coder_channels, learner_kernel, coder_kernel_size,
            norm=norm, **options,
        )  # fmt: skip
        self.kernel_size = kernel_size

    def _make_norm(self, channels: int) -> nn.Module:
        return nn.BatchNorm2d(channels, eps=self.config.eps, momentum=self.config.momentum)

    def reparameterize(self, form: str = "fast") -> nn.Module:
        """This block (in eval mode) as plain torch.nn layers, batch norms folded:
        :func:`pnnh_kernels.deploy.reparameterize_conv`."""
        from .deploy import reparameterize_conv

        return reparameterize_conv(self, form)
