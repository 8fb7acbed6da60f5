"""Small layers and initialisers the model families share."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def drop_path(x: Tensor, drop_prob: float, training: bool) -> Tensor:
    """Stochastic depth per sample (timm's definition): zero whole samples, rescale by the keep probability."""
    if drop_prob == 0.0 or not training:
        return x
    keep = 1.0 - drop_prob
    mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
    return x * mask / keep


class DropPath(nn.Module):
    """Per-sample stochastic depth on a residual branch."""

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= drop_prob < 1.0:
            raise ValueError(f"drop_prob must lie in [0, 1), got {drop_prob}")
        self.drop_prob = drop_prob

    def forward(self, x: Tensor) -> Tensor:
        return drop_path(x, self.drop_prob, self.training)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob:g}"


def drop_path_rates(rate: float, count: int) -> list[float]:
    """Linearly increasing drop rates over ``count`` blocks, the last one at ``rate`` (timm's rule)."""
    if count <= 1:
        return [rate] * count
    return [rate * i / (count - 1) for i in range(count)]


def conv_bn(in_ch: int, out_ch: int, kernel_size: int, stride: int = 1) -> nn.Sequential:
    """conv (no bias) + batch norm, He-initialised as torchvision's ResNets."""
    conv = nn.Conv2d(in_ch, out_ch, kernel_size, stride, padding=kernel_size // 2, bias=False)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    return nn.Sequential(conv, nn.BatchNorm2d(out_ch))


def scaled_orthogonal_(weight: Tensor, gain: float = 1.0, delta: bool = True) -> Tensor:
    """Scaled (delta-)orthogonal init as DKS/TAT use it.

    The ``[out, in]`` matrix is orthogonal and scaled by ``gain * max(1, sqrt(out / in))``, so that
    ``E|W x|^2 = gain^2 |x|^2`` also when the layer widens. Convolutions (PyTorch's
    ``[out, in, kh, kw]`` layout) get the matrix at the centre tap and zeros elsewhere (delta).
    """
    out_dim, in_dim = weight.shape[0], weight.shape[1]
    scale = gain * max(1.0, math.sqrt(out_dim / in_dim))
    with torch.no_grad():
        matrix = nn.init.orthogonal_(torch.empty(out_dim, in_dim, dtype=torch.float64)) * scale
        if weight.dim() == 2:
            return weight.copy_(matrix)
        if not delta:
            raise ValueError("non-delta orthogonal convolution init is not offered")
        weight.zero_()
        weight[:, :, weight.shape[2] // 2, weight.shape[3] // 2] = matrix
    return weight


class PerLocationNormalization(nn.Module):
    """DKS's per-location normalisation of the input, over the channel dimension of ``(N, C, H, W)``.

    A homogeneous coordinate of 1 is appended first (so the input's scale is not lost), then each
    location is rescaled so that its mean squared value over channels is 1: every input "q value" is 1,
    which the TAT/DKS kernel maps assume. The output has ``C + 1`` channels.
    """

    def __init__(self, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
        return x * torch.rsqrt(x.pow(2).mean(dim=1, keepdim=True) + self.eps)


def global_pool(x: Tensor) -> Tensor:
    return F.adaptive_avg_pool2d(x, 1).flatten(1)
