"""PNNHLinear in eval mode as plain torch.nn layers (:func:`reparameterize_linear`).

Batch norm (and ``norm="none"``) folds exactly as in :mod:`.conv` with 1x1 kernels: ``fast`` is
``layer2(base(layer1 x)) + coder_map x``, ``plain`` is ``Linear -> base -> Linear`` with the signed coder
copies. Layer norm normalises each token by its own statistics and does not fold: both forms keep the
block's three ``nn.LayerNorm`` layers; ``fast`` runs layer 2 as one product over ``[z_c, act(z_l)]``,
``plain`` over ``base([z_l, z_c, -z_c])`` (a concatenation and a negation, no addition).
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from ..block import decoder_linear_weight
from ..linear import PNNHLinear
from .conv import FastBlock
from .folding import (
    CannotFold,
    affine_of,
    base_activation,
    bias_or_zeros,
    final_activation,
    linear_layer,
    scaled_rows,
)


class LayerNormBlock(nn.Module):
    """A layer-norm PNNHLinear as torch.nn layers; see :mod:`.linear`."""

    def __init__(
        self, layer1: nn.Linear, norms: tuple[nn.Module, nn.Module, nn.Module], activation: nn.Module,
        layer2: nn.Linear, final: nn.Module, coder_features: int, plain: bool,
    ) -> None:  # fmt: skip
        super().__init__()
        self.layer1, self.layer2, self.activation, self.final = layer1, layer2, activation, final
        self.coder_norm, self.learner_norm, self.out_norm = norms
        self.coder_features, self.plain = coder_features, plain

    def forward(self, x: Tensor) -> Tensor:
        z = self.layer1(x)
        z_c = self.coder_norm(z[..., : self.coder_features])
        z_l = self.learner_norm(z[..., self.coder_features :])
        if self.plain:
            hidden = self.activation(torch.cat([z_l, z_c, -z_c], dim=-1))
        else:
            hidden = torch.cat([z_c, self.activation(z_l)], dim=-1)
        return self.final(self.out_norm(self.layer2(hidden)))


def _layer_norm_form(block: PNNHLinear, form: str) -> LayerNormBlock:
    w, act = block.block_weights(), block.config.activation
    cc, like = w.encoder.shape[0], w.learner1
    assert block.out_norm is not None  # a layer-norm block has its three norms
    out_norm = copy.deepcopy(block.out_norm)
    final, f = final_activation(act, block.config.final_activation)
    if f != 1.0:  # the final activation's scale moves into the output norm's affine
        with torch.no_grad():
            out_norm.weight.mul_(f)  # type: ignore[operator]
            out_norm.bias.mul_(f)  # type: ignore[operator]
    layer1 = linear_layer(
        torch.cat([w.encoder, w.learner1]).double(),
        torch.cat([bias_or_zeros(w.encoder_bias, cc, like), bias_or_zeros(w.learner1_bias, w.learner1.shape[0], like)]),
        like,
    )
    decoder, learner2 = decoder_linear_weight(w).double(), w.learner2.double() * act.scale
    bias2 = bias_or_zeros(w.learner2_bias, w.learner2.shape[0], like)
    if form == "plain":
        weight2 = torch.cat([learner2, decoder * act.scale, -decoder * act.scale], dim=1)
    else:
        weight2 = torch.cat([decoder * act.coder_gain, learner2], dim=1)
    assert block.coder_norm is not None and block.learner_norm is not None
    norms = (copy.deepcopy(block.coder_norm), copy.deepcopy(block.learner_norm), out_norm)
    layer2 = linear_layer(weight2, bias2, like)
    return LayerNormBlock(layer1, norms, base_activation(act), layer2, final, cc, form == "plain")


def _folded_form(block: PNNHLinear, form: str) -> nn.Module:
    w, norms, config = block.block_weights(), block.block_norms(), block.config
    act, like = config.activation, w.learner1
    cc, hid, out = w.encoder.shape[0], w.learner1.shape[0], w.learner2.shape[0]
    a_c, a_1, a_2 = (affine_of(n, width, config.eps, like) for n, width in zip(norms, (cc, hid, out)))
    final, f = final_activation(act, config.final_activation)
    s2, t2 = a_2.scale * f, a_2.shift * f
    enc_w, enc_b = scaled_rows(w.encoder, a_c.scale), a_c.scale * bias_or_zeros(w.encoder_bias, cc, like) + a_c.shift
    l1_w, l1_b = scaled_rows(w.learner1, a_1.scale), a_1.scale * bias_or_zeros(w.learner1_bias, hid, like) + a_1.shift
    l2_w, l2_b = scaled_rows(w.learner2, s2) * act.scale, s2 * bias_or_zeros(w.learner2_bias, out, like) + t2
    dec = scaled_rows(decoder_linear_weight(w), s2)
    if form == "plain":
        layer1 = linear_layer(torch.cat([l1_w, enc_w, -enc_w]), torch.cat([l1_b, enc_b, -enc_b]), like)
        layer2 = linear_layer(torch.cat([l2_w, dec * act.scale, -dec * act.scale], dim=1), l2_b, like)
        last = [] if isinstance(final, nn.Identity) else [final]
        return nn.Sequential(layer1, base_activation(act), layer2, *last)
    coder = (dec * act.coder_gain) @ enc_w
    coder_bias = (dec * act.coder_gain) @ enc_b
    return FastBlock(
        linear_layer(l1_w, l1_b, like), base_activation(act), linear_layer(l2_w, l2_b + coder_bias, like), final,
        coder_map=linear_layer(coder, None, like),
    )  # fmt: skip


def reparameterize_linear(block: PNNHLinear, form: str = "fast") -> nn.Module:
    """``block`` (in eval mode) as plain torch.nn layers computing the same function; see :mod:`.linear`."""
    if block.training:
        raise CannotFold("it is in training mode (call model.eval() first: batch norm folds its running statistics)")
    if block.config.norm == "layer":
        return _layer_norm_form(block, form)
    return _folded_form(block, form)
