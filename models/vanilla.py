"""Deep vanilla networks (no shortcuts, no normalisation) made trainable by kernel shaping.

The layout is the CIFAR ResNet's (a stem conv, three stages of 2n 3x3 convs at 16/32/64 channels,
stride 2 entering stages 2 and 3) with every shortcut and batch norm removed; convolutions carry
biases. ``method`` picks the activation and initialisation:

- ``tat``: TAT's transformed Leaky ReLU (slope from the depth and ``c_val_0_target``), the paper's method;
- ``dks``: DKS's transformed smooth activation (``dks_activation``: softplus or tanh), a baseline;
- ``eoc``: plain ReLU or tanh with Edge-of-Chaos weight/bias scales, the other baseline.

Weights are scaled delta-orthogonal (dense: scaled orthogonal), and the input passes through
per-location normalisation so every location enters with q = 1, as the kernel maps assume.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .kernel_maps import dks_activation, edge_of_chaos, tat_leaky_relu
from .layers import PerLocationNormalization, global_pool, scaled_orthogonal_
from .registry import register_model

METHODS = ("tat", "dks", "eoc")


class ScaledLeakyReLU(nn.Module):
    def __init__(self, negative_slope: float, output_scale: float) -> None:
        super().__init__()
        self.negative_slope, self.output_scale = negative_slope, output_scale

    def forward(self, x: Tensor) -> Tensor:
        return F.leaky_relu(x, self.negative_slope) * self.output_scale

    def extra_repr(self) -> str:
        return f"negative_slope={self.negative_slope:.6f}, output_scale={self.output_scale:.6f}"


class TransformedSmooth(nn.Module):
    """``output_scale * (phi(input_scale * x + input_shift) + output_shift)`` (DKS)."""

    _FUNCTIONS: ClassVar[dict] = {"softplus": F.softplus, "tanh": torch.tanh}

    def __init__(self, activation: str, input_scale=1.0, input_shift=0.0, output_shift=0.0, output_scale=1.0):
        super().__init__()
        self.activation = activation
        self.input_scale, self.input_shift = input_scale, input_shift
        self.output_shift, self.output_scale = output_shift, output_scale

    def forward(self, x: Tensor) -> Tensor:
        phi = self._FUNCTIONS[self.activation]
        return self.output_scale * (phi(self.input_scale * x + self.input_shift) + self.output_shift)

    def extra_repr(self) -> str:
        return (
            f"{self.activation}, input_scale={self.input_scale:.5f}, input_shift={self.input_shift:.5f}, "
            f"output_shift={self.output_shift:.5f}, output_scale={self.output_scale:.5f}"
        )


class VanillaNet(nn.Module):
    def __init__(
        self,
        depth: int,
        method: str = "tat",
        *,
        num_classes: int = 10,
        in_chans: int = 3,
        widths: tuple[int, int, int] = (16, 32, 64),
        per_location_norm: bool = True,
        c_val_0_target: float = 0.9,
        c_slope_1_target: float = 1.5,
        dks_activation_name: str = "softplus",
        eoc_activation: str = "relu",
        eoc_bias_variance: float = 0.0,
    ) -> None:
        super().__init__()
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if (depth - 2) % 6 != 0:
            raise ValueError(f"vanilla net depth must be 6n + 2 (as the CIFAR ResNets), got {depth}")
        n = (depth - 2) // 6
        self.method = method
        self.nonlinear_depth = 6 * n + 1  # one activation after every conv: the chain's length L
        self.act, gain, bias_std = self._activation(
            method, c_val_0_target, c_slope_1_target, dks_activation_name, eoc_activation, eoc_bias_variance
        )
        self.input_norm = PerLocationNormalization() if per_location_norm else nn.Identity()

        convs = []
        in_ch = in_chans + (1 if per_location_norm else 0)
        plan = [(widths[0], 1)] + [
            (w, 2 if (i == 0 and s > 0) else 1) for s, w in enumerate(widths) for i in range(2 * n)
        ]
        for out_ch, stride in plan:
            conv = nn.Conv2d(in_ch, out_ch, 3, stride, padding=1, bias=True)
            scaled_orthogonal_(conv.weight, gain=gain)
            nn.init.normal_(conv.bias, std=bias_std) if bias_std > 0 else nn.init.zeros_(conv.bias)
            convs.append(conv)
            in_ch = out_ch
        self.convs = nn.ModuleList(convs)
        self.num_features = in_ch
        self.head = nn.Linear(in_ch, num_classes)
        scaled_orthogonal_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def _activation(self, method, c_val_0_target, c_slope_1_target, dks_name, eoc_activation, eoc_bias_variance):
        if method == "tat":
            p = tat_leaky_relu(self.nonlinear_depth, c_val_0_target)
            return ScaledLeakyReLU(p.negative_slope, p.output_scale), 1.0, 0.0
        if method == "dks":
            p = dks_activation(dks_name, self.nonlinear_depth, c_slope_1_target)
            return TransformedSmooth(dks_name, p.input_scale, p.input_shift, p.output_shift, p.output_scale), 1.0, 0.0
        p = edge_of_chaos(eoc_activation, eoc_bias_variance)
        act = nn.ReLU() if eoc_activation == "relu" else nn.Tanh()
        return act, p.weight_std, p.bias_std

    def forward_features(self, x: Tensor, return_all: bool = False):
        x = self.input_norm(x)
        features = []
        for conv in self.convs:
            x = self.act(conv(x))
            features.append(x)
        return features if return_all else x

    def forward(self, x: Tensor) -> Tensor:
        return self.head(global_pool(self.forward_features(x)))


def _register(method: str) -> None:
    for depth in (20, 32, 44, 56, 110):

        def build(depth=depth, drop_path_rate: float = 0.0, **kwargs):
            if drop_path_rate:
                raise ValueError("drop_path_rate applies to residual models only")
            return VanillaNet(depth, method, **kwargs)

        build.__name__ = f"{method}_vanilla{depth}"
        build.__doc__ = f"Vanilla (no shortcut, no norm) CIFAR-layout net of depth {depth}, {method.upper()} shaped."
        register_model("vanilla")(build)


for _method in METHODS:
    _register(_method)

__all__ = ["METHODS", "ScaledLeakyReLU", "TransformedSmooth", "VanillaNet"]
