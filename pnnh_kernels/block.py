"""The data a PNNH block computes with: weights, normalisation parameters, and configuration.

These containers are what every backend receives, so that the module classes, the functional API and
the kernels agree on one description of the block (docs/DESIGN.md):

    layer 1:  z_c = N_c(enc(x))            coder encoder  (Cc channels)
              z_l = N_1(learn1(x))         learner        (H channels)
              h   = act([z_c, -z_c, z_l])
    layer 2:  y   = act(N_2(layer2(h)))    layer2 weight = [W_d, -W_d, W_2]

``decoder=None`` means *tied*: the decoder is the encoder's adjoint (a transpose for linear and 1x1
kernels, a transposed convolution with the same weight for k x k kernels).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple, Optional, Union

import torch
from torch import Tensor

from .activation import Activation

#: what a module's ``device=`` takes
DeviceLike = Union[torch.device, str, int, None]

NORMS_CONV = ("batch", "none")
NORMS_LINEAR = ("batch", "layer", "none")


class NormParams(NamedTuple):
    """Affine parameters and (for batch norm) running statistics of one normalisation layer."""

    weight: Optional[Tensor]
    bias: Optional[Tensor]
    running_mean: Optional[Tensor] = None
    running_var: Optional[Tensor] = None


class BlockWeights(NamedTuple):
    """Weights of one PNNH block. Conv: ``[out, in, k, k]``; linear: ``[out, in]``."""

    encoder: Tensor
    learner1: Tensor
    learner2: Tensor
    decoder: Optional[Tensor] = None
    encoder_bias: Optional[Tensor] = None
    learner1_bias: Optional[Tensor] = None
    learner2_bias: Optional[Tensor] = None

    @property
    def tied(self) -> bool:
        return self.decoder is None


class BlockNorms(NamedTuple):
    """Normalisation of the coder (``N_c``), the learner (``N_1``) and the block output (``N_2``)."""

    coder: Optional[NormParams] = None
    learner: Optional[NormParams] = None
    out: Optional[NormParams] = None


@dataclass(frozen=True)
class BlockConfig:
    """Everything about a block that is not a tensor."""

    activation: Activation = field(default_factory=Activation)
    norm: str = "batch"
    final_activation: bool = True
    eps: float = 1e-5
    momentum: float = 0.1

    def __post_init__(self) -> None:
        if self.norm not in NORMS_LINEAR:
            raise ValueError(f"norm must be one of {NORMS_LINEAR}, got {self.norm!r}")
        if not (self.eps > 0.0):
            raise ValueError(f"eps must be positive, got {self.eps}")
        if not (0.0 <= self.momentum <= 1.0):
            raise ValueError(f"momentum must lie in [0, 1], got {self.momentum}")


def decoder_conv_weight(weights: BlockWeights) -> Tensor:
    """The decoder as an ordinary conv2d weight ``[out, Cc, kc, kc]``.

    Tied: ``conv_transpose2d(z, W_e, padding=p)`` equals ``conv2d(z, W_e^T flipped, padding=k-1-p)``,
    and with 'same' padding of an odd kernel ``k-1-p == p``.
    """
    if weights.decoder is not None:
        return weights.decoder
    return weights.encoder.transpose(0, 1).flip(-1, -2)


def decoder_linear_weight(weights: BlockWeights) -> Tensor:
    """The decoder as a linear weight ``[out, Dc]`` (tied: the encoder's transpose)."""
    return weights.encoder.t() if weights.decoder is None else weights.decoder


def same_padding(kernel_size: int) -> int:
    return kernel_size // 2


def pad_kernel(weight: Tensor, size: int) -> Tensor:
    """Zero-pad a square odd kernel to ``size x size`` around its centre (same conv result)."""
    k = weight.shape[-1]
    if k == size:
        return weight
    p = (size - k) // 2
    return torch.nn.functional.pad(weight, (p, p, p, p))
