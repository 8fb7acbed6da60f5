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
from .folding import FoldedBlock, base_activation, bias_or_zeros, check_eval, final_activation, linear_layer


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
    f = FoldedBlock(block, decoder_linear_weight(block.block_weights()))
    act, like, final = f.act, f.like, f.final
    enc_w, enc_b, l1_w, l1_b, l2_w, l2_b, dec = f.enc_w, f.enc_b, f.l1_w, f.l1_b, f.l2_w, f.l2_b, f.dec
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
    check_eval(block)
    if block.config.norm == "layer":
        return _layer_norm_form(block, form)
    return _folded_form(block, form)
