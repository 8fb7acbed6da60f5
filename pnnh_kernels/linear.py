"""PNNHLinear: the PNNH block on the last dimension of a tensor (the Transformer MLP form)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ._block_module import PNNHBlockBase
from .activation import ActivationLike
from .block import NORMS_LINEAR, DeviceLike
from .coder import PNNHCoder
from .functional import pnnh_linear


class PNNHLinear(PNNHBlockBase):
    """Two plain linear-norm-act layers with a weight-sharing coder and a learner; no residual addition.

    Maps ``(..., in_features)`` to ``(..., out_features)``. ``hidden_features`` is the learner width
    (the MLP's hidden size, default ``4 * out_features`` as in a Transformer). Norms: ``"layer"``
    (default), ``"batch"`` (statistics over every leading dimension) or ``"none"``. The activation
    may also be ``"gelu"``, whose odd part is the identity, so the coder path survives it too.
    """

    _functional = staticmethod(pnnh_linear)

    def __init__(
        self,
        in_features: int,
        out_features: Optional[int] = None,
        hidden_features: Optional[int] = None,
        *,
        coder_features: Optional[int] = None,
        activation: ActivationLike = "relu",
        negative_slope: Optional[float] = None,
        activation_scale: float = 1.0,
        final_activation: bool = True,
        norm: str = "layer",
        bias: Optional[bool] = None,
        tied: bool = True,
        coder: Optional[PNNHCoder] = None,
        eps: float = 1e-5,
        momentum: float = 0.1,
        backend: str = "auto",
        device: DeviceLike = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        if norm not in NORMS_LINEAR:
            raise ValueError(f"PNNHLinear norm must be one of {NORMS_LINEAR}, got {norm!r}")
        out = in_features if out_features is None else out_features
        hidden = 4 * out if hidden_features is None and isinstance(out, int) else hidden_features

        def make_norm(c: int) -> nn.Module:
            if norm == "layer":
                return nn.LayerNorm(c, eps=eps)
            return nn.BatchNorm1d(c, eps=eps, momentum=momentum)

        super().__init__(
            in_features,
            out_features,
            hidden,
            coder_features,
            (),
            None,
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
            make_norm=make_norm,
            device=device,
            dtype=dtype,
        )
        self.in_features, self.out_features, self.hidden_features = (
            self.in_channels,
            self.out_channels,
            self.hidden_channels,
        )
