"""PNNHLinear: the PNNH block on the last dimension of a tensor (the Transformer MLP form)."""

from __future__ import annotations

from typing import Optional

from torch import nn
from typing_extensions import Unpack

from ._block_module import BlockOptions, PNNHBlockBase
from .block import NORMS_LINEAR
from .functional import pnnh_linear


class PNNHLinear(PNNHBlockBase):
    """Two plain linear-norm-act layers with a weight-sharing coder and a learner; no residual addition.

    Maps ``(..., in_features)`` to ``(..., out_features)``. ``hidden_features`` is the learner width
    (the MLP's hidden size, default ``4 * out_features`` as in a Transformer). Norms: ``"layer"``
    (default), ``"batch"`` (statistics over every leading dimension) or ``"none"``. The activation
    may also be ``"gelu"``, whose odd part is the identity, so the coder path survives it too.
    ``coder_features`` is the coder width (default ``in_features``); the other keyword options are
    :class:`PNNHConv2d`'s (:class:`~pnnh_kernels._block_module.BlockOptions`).
    """

    _functional = staticmethod(pnnh_linear)

    def __init__(
        self,
        in_features: int,
        out_features: Optional[int] = None,
        hidden_features: Optional[int] = None,
        *,
        coder_features: Optional[int] = None,
        norm: str = "layer",
        **options: Unpack[BlockOptions],
    ) -> None:
        if norm not in NORMS_LINEAR:
            raise ValueError(f"PNNHLinear norm must be one of {NORMS_LINEAR}, got {norm!r}")
        out = in_features if out_features is None else out_features
        hidden = 4 * out if hidden_features is None and isinstance(out, int) else hidden_features
        super().__init__(in_features, out_features, hidden, coder_features, (), None, norm=norm, **options)
        self.in_features, self.out_features = self.in_channels, self.out_channels
        self.hidden_features = self.hidden_channels

    def reparameterize(self, form: str = "fast") -> nn.Module:
        """This block (in eval mode) as plain torch.nn layers: :func:`pnnh_kernels.deploy.reparameterize_linear`."""
        from .deploy import reparameterize_linear

        return reparameterize_linear(self, form)

    def _make_norm(self, channels: int) -> nn.Module:
        if self.config.norm == "layer":
            return nn.LayerNorm(channels, eps=self.config.eps)
        return nn.BatchNorm1d(channels, eps=self.config.eps, momentum=self.config.momentum)
