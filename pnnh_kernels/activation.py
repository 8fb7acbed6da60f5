"""Activation functions the PNNH block supports, and the coder gain each one implies.

Every fused kernel implements the *scaled leaky* family ``scale * LReLU_slope(a)``:
``relu`` is slope 0, ``identity`` is slope 1, ``leaky_relu`` anything in between
(TAT's transformed Leaky ReLU is this family with a tuned slope and scale).
``gelu`` is offered for the Transformer MLP (PNNHLinear): the pure-PyTorch backends and the fused
'cpu' and 'triton' PNNHLinear serve it; the conv block's fused kernels take the leaky family only.

The coder path relies on the odd part of the activation being linear:
``act(a) - act(-a) = gain * a``.  For the leaky family ``gain = scale * (1 + slope)``;
for GELU ``GELU(a) - GELU(-a) = a`` so ``gain = scale``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Union

import torch
import torch.nn.functional as F

_KINDS = ("relu", "leaky_relu", "identity", "gelu")


@dataclass(frozen=True)
class Activation:
    """``scale * f(a)`` where ``f`` is ReLU, LeakyReLU(``negative_slope``), identity or GELU."""

    kind: str = "relu"
    negative_slope: float = 0.0
    scale: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ValueError(f"activation must be one of {_KINDS}, got {self.kind!r}")
        for name in ("negative_slope", "scale"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"activation {name} must be a finite number, got {value!r}")
        if self.kind == "relu" and self.negative_slope != 0.0:
            raise ValueError("relu has no negative_slope; use kind='leaky_relu'")
        if self.kind == "identity" and self.negative_slope not in (0.0, 1.0):
            raise ValueError("identity has no negative_slope")
        if self.kind == "gelu" and self.negative_slope != 0.0:
            raise ValueError("gelu has no negative_slope")
        if self.scale == 0.0:
            raise ValueError("activation scale must be non-zero (the coder path would vanish)")

    @property
    def is_leaky_family(self) -> bool:
        """True when the activation is ``scale * LReLU_slope``: what the fused kernels implement."""
        return self.kind != "gelu"

    @property
    def slope(self) -> float:
        """Slope on the negative side for the leaky family (relu 0, identity 1)."""
        if self.kind == "identity":
            return 1.0
        return float(self.negative_slope)

    @property
    def coder_gain(self) -> float:
        """``g`` such that ``act(a) - act(-a) == g * a`` for every ``a``."""
        if self.kind == "gelu":
            return float(self.scale)
        return float(self.scale) * (1.0 + self.slope)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "gelu":
            y = F.gelu(x)
        elif self.kind == "relu":
            y = F.relu(x)
        elif self.kind == "identity":
            y = x
        else:
            y = F.leaky_relu(x, self.negative_slope)
        return y if self.scale == 1.0 else y * self.scale


ActivationLike = Union[str, Activation]


def make_activation(activation: ActivationLike, negative_slope: float | None = None, scale: float = 1.0) -> Activation:
    """Build an :class:`Activation` from a name (plus options) or pass one through unchanged."""
    if isinstance(activation, Activation):
        if negative_slope is not None or scale != 1.0:
            raise ValueError("pass either an Activation object or its options, not both")
        return activation
    if not isinstance(activation, str):
        raise TypeError(f"activation must be a string or an Activation, got {type(activation).__name__}")
    if activation == "leaky_relu":
        return Activation("leaky_relu", 0.01 if negative_slope is None else float(negative_slope), scale)
    if negative_slope is not None:
        raise ValueError(f"negative_slope applies to leaky_relu only, not {activation!r}")
    return Activation(activation, 0.0, scale)
