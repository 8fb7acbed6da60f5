"""What reparameterization folds: an eval-mode batch norm into the layer before it, and an activation's
scale into the layer after it (or, for a positively homogeneous activation, into the one before)."""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor, nn

from .._block_module import PNNHBlockBase
from ..activation import Activation
from ..block import NormParams


class CannotFold(ValueError):
    """A block whose eval-mode function is not a fixed linear-algebra one (the message names why)."""


class Affine(NamedTuple):
    """A per-channel map ``v * scale + shift``: an eval-mode batch norm, or the identity for ``norm="none"``."""

    scale: Tensor
    shift: Tensor


def affine_of(params: Optional[NormParams], width: int, eps: float, like: Tensor) -> Affine:
    """The eval-mode batch norm ``params`` as an :class:`Affine` (in float64); ``None``: the identity."""
    one = torch.ones(width, dtype=torch.float64, device=like.device)
    if params is None:
        return Affine(one, torch.zeros_like(one))
    if params.running_mean is None or params.running_var is None:
        raise CannotFold("a batch norm without running statistics normalises with the batch's even in eval")
    gamma = one if params.weight is None else params.weight.double()
    beta = torch.zeros_like(one) if params.bias is None else params.bias.double()
    scale = gamma / torch.sqrt(params.running_var.double() + eps)
    return Affine(scale, beta - params.running_mean.double() * scale)


def bias_or_zeros(bias: Optional[Tensor], width: int, like: Tensor) -> Tensor:
    """A layer's bias in float64, or zeros where it has none."""
    return torch.zeros(width, dtype=torch.float64, device=like.device) if bias is None else bias.detach().double()


def scaled_rows(weight: Tensor, scale: Tensor) -> Tensor:
    """``weight`` with output channel ``o`` multiplied by ``scale[o]`` (any trailing kernel dimensions)."""
    return weight.double() * scale.view(-1, *([1] * (weight.dim() - 1)))


def base_activation(act: Activation) -> nn.Module:
    """The activation without its scale, as a torch.nn layer."""
    if act.kind == "gelu":
        return nn.GELU()
    if act.slope == 1.0:
        return nn.Identity()
    if act.slope == 0.0:
        return nn.ReLU()
    return nn.LeakyReLU(act.slope)


def odd_gain(act: Activation) -> float:
    """``q`` with ``base(v) - base(-v) = q * v`` (so the activation's coder gain is ``scale * q``)."""
    return 1.0 if act.kind == "gelu" else 1.0 + act.slope


def homogeneous(act: Activation) -> bool:
    """Whether ``scale * base(v) = base(scale * v)``: the leaky family with a positive scale."""
    return act.kind != "gelu" and act.scale > 0


class Scaled(nn.Module):
    """``base(v) * scale``: a final activation whose scale cannot move into the layer before it."""

    def __init__(self, base: nn.Module, scale: float) -> None:
        super().__init__()
        self.base, self.scale = base, scale

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) * self.scale


def final_activation(act: Activation, enabled: bool) -> tuple[nn.Module, float]:
    """(the block's last layer, the factor to fold into the layer before it)."""
    if not enabled:
        return nn.Identity(), 1.0
    if homogeneous(act):
        return base_activation(act), act.scale
    return Scaled(base_activation(act), act.scale), 1.0


def conv_layer(weight: Tensor, bias: Optional[Tensor], like: Tensor) -> nn.Conv2d:
    """A 'same'-padded stride-1 nn.Conv2d holding ``weight`` (float64 arithmetic, cast to ``like``'s dtype)."""
    out_ch, in_ch, k, _ = weight.shape
    layer = nn.Conv2d(in_ch, out_ch, k, padding=k // 2, bias=bias is not None, device=like.device, dtype=like.dtype)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)  # type: ignore[union-attr]
    return layer


def linear_layer(weight: Tensor, bias: Optional[Tensor], like: Tensor) -> nn.Linear:
    out_f, in_f = weight.shape
    layer = nn.Linear(in_f, out_f, bias=bias is not None, device=like.device, dtype=like.dtype)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    return layer


def batch_norm_params(norm: nn.Module) -> NormParams:
    """An nn.BatchNorm's parameters and running statistics as :class:`NormParams`."""
    return NormParams(norm.weight, norm.bias, norm.running_mean, norm.running_var)  # type: ignore[arg-type]


def fold_conv_bn(conv: nn.Conv2d, norm: nn.Module) -> tuple[Tensor, Tensor]:
    """(weight, bias) in float64 of ``norm(conv(x))`` as one convolution (eval mode)."""
    affine = affine_of(batch_norm_params(norm), conv.out_channels, norm.eps, conv.weight)  # type: ignore[arg-type]
    bias = conv.bias.detach().double() if conv.bias is not None else torch.zeros_like(affine.shift)
    return scaled_rows(conv.weight.detach(), affine.scale), affine.scale * bias + affine.shift


def check_eval(block: nn.Module) -> None:
    if block.training:
        raise CannotFold("it is in training mode (call model.eval() first: batch norm folds its running statistics)")


class FoldedBlock:
    """A PNNH block's weights with its batch norms (or ``norm="none"`` biases) and activation scales folded, in
    float64: layer 1's coder (``enc_w``, ``enc_b``) and learner (``l1_w``, ``l1_b``) rows, layer 2's learner
    (``l2_w``, ``l2_b``, the learner activation's scale moved in) and the ``decoder`` (conv or linear weight)
    with the output norm folded (times the gain in the fast form); ``final`` is the last layer."""

    def __init__(self, block: PNNHBlockBase, decoder: Tensor) -> None:
        check_eval(block)
        w, norms, config = block.block_weights(), block.block_norms(), block.config
        act, like = config.activation, w.learner1
        widths = (w.encoder.shape[0], w.learner1.shape[0], w.learner2.shape[0])
        a_c, a_1, a_2 = (affine_of(n, width, config.eps, like) for n, width in zip(norms, widths))
        self.like, self.act = like, act
        self.final, f = final_activation(act, config.final_activation)
        s2, t2 = a_2.scale * f, a_2.shift * f
        self.enc_w = scaled_rows(w.encoder, a_c.scale)
        self.enc_b = a_c.scale * bias_or_zeros(w.encoder_bias, widths[0], like) + a_c.shift
        self.l1_w = scaled_rows(w.learner1, a_1.scale)
        self.l1_b = a_1.scale * bias_or_zeros(w.learner1_bias, widths[1], like) + a_1.shift
        self.l2_w = scaled_rows(w.learner2, s2) * act.scale
        self.l2_b = s2 * bias_or_zeros(w.learner2_bias, widths[2], like) + t2
        self.dec = scaled_rows(decoder, s2)
