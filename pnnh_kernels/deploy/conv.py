"""PNNHConv2d in eval mode as plain torch.nn layers, every batch norm folded (:func:`reparameterize_conv`).

With ``A_c``, ``A_1``, ``A_2`` the three eval-mode norms as per-channel affine maps, ``act = s * base``,
gain ``g = s * q`` (``base(v) - base(-v) = q v``) and ``D`` the decoder as a convolution:

    y = act_f(A_2(W_2 act(A_1(W_1 x)) + g D A_c(W_e x)))

- ``fast``: the fewest operations. Layer 1 is one convolution (coder and learner outputs together where
  their kernels agree), the base activation on the learner channels, layer 2 one convolution, and the
  coder path added before the output: for a 1x1 coder one 1x1 convolution of x (``D A_c W_e`` folded into
  one matrix), for a k x k coder its two convolutions (folding them into one would be wrong at the
  border, where the intermediate map's padding is zero but its bias is not).
- ``plain``: ``Conv2d -> base activation -> Conv2d`` and nothing else: layer 1 also writes the signed
  coder copies ``[A_c W_e x, -A_c W_e x]`` as extra channels and layer 2 reads them through ``[D, -D]``
  (``base(v) - base(-v) = q v``), the paper's point made literal: no addition anywhere. Cost: layer 1
  has 2 Cc more output channels and layer 2 2 Cc more input channels (and the coder's k x k taps at the
  learner's kernel size), against the fast form's coder convolution(s) and one addition.

Scales move into the layer after an activation; a final activation's scale into the layer before it
when the activation is positively homogeneous (the leaky family with a positive scale).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from ..block import decoder_conv_weight, pad_kernel
from ..conv import PNNHConv2d
from .folding import (
    CannotFold,
    affine_of,
    base_activation,
    bias_or_zeros,
    conv_layer,
    final_activation,
    scaled_rows,
)


class FastBlock(nn.Module):
    """The ``fast`` form: ``final(layer2(base(learner)) + coder path)``; see :mod:`.conv`. Also the
    folded PNNHLinear (its coder path always one ``coder_map`` of x: a linear coder is 1x1)."""

    def __init__(
        self, layer1: nn.Module, activation: nn.Module, layer2: nn.Module, final: nn.Module, *,
        coder_map: Optional[nn.Module] = None, encoder: Optional[nn.Module] = None,
        decoder: Optional[nn.Module] = None, coder_channels: int = 0,
    ) -> None:  # fmt: skip
        super().__init__()
        self.layer1, self.activation, self.layer2, self.final = layer1, activation, layer2, final
        self.coder_map, self.encoder, self.decoder = coder_map, encoder, decoder
        self.coder_channels = coder_channels  # > 0: layer 1's first channels are the coder's (joint)

    def forward(self, x: Tensor) -> Tensor:
        z = self.layer1(x)
        if self.coder_map is not None:  # a 1x1 coder, folded into one map of x
            return self.final(self.layer2(self.activation(z)) + self.coder_map(x))
        assert self.decoder is not None
        if self.encoder is not None:  # coder and learner kernels differ: two layer-1 convolutions
            z_c, z_l = self.encoder(x), z
        else:
            z_c, z_l = z[:, : self.coder_channels], z[:, self.coder_channels :]
        return self.final(self.layer2(self.activation(z_l)) + self.decoder(z_c))


class _Folded:
    """A block's weights with its norms, biases and activation scales folded, in float64."""

    def __init__(self, block: PNNHConv2d) -> None:
        if block.training:
            raise CannotFold(
                "it is in training mode (call model.eval() first: batch norm folds its running statistics)"
            )
        w, norms, config = block.block_weights(), block.block_norms(), block.config
        act, eps = config.activation, config.eps
        cc, hid, out = w.encoder.shape[0], w.learner1.shape[0], w.learner2.shape[0]
        a_c, a_1, a_2 = (affine_of(n, width, eps, w.learner1) for n, width in zip(norms, (cc, hid, out)))
        self.like, self.act, self.cc = w.learner1, act, cc
        self.final, f = final_activation(act, config.final_activation)
        s2, t2 = a_2.scale * f, a_2.shift * f
        self.enc_w, self.enc_b = (
            scaled_rows(w.encoder, a_c.scale),
            a_c.scale * bias_or_zeros(w.encoder_bias, cc, w.encoder) + a_c.shift,
        )
        self.l1_w, self.l1_b = (
            scaled_rows(w.learner1, a_1.scale),
            a_1.scale * bias_or_zeros(w.learner1_bias, hid, w.encoder) + a_1.shift,
        )
        self.l2_w = scaled_rows(w.learner2, s2) * act.scale  # the learner activation's scale moves here
        self.l2_b = s2 * bias_or_zeros(w.learner2_bias, out, w.encoder) + t2
        self.dec = scaled_rows(decoder_conv_weight(w), s2)  # times the gain in the fast form
        self.kc, self.k = w.encoder.shape[-1], w.learner1.shape[-1]


def _fast(f: _Folded) -> FastBlock:
    gain, like = f.act.coder_gain, f.like
    if f.kc == 1:
        coder = (f.dec[:, :, 0, 0] * gain) @ f.enc_w[:, :, 0, 0]
        coder_bias = (f.dec[:, :, 0, 0] * gain) @ f.enc_b
        return FastBlock(
            conv_layer(f.l1_w, f.l1_b, like), base_activation(f.act), conv_layer(f.l2_w, f.l2_b + coder_bias, like),
            f.final, coder_map=conv_layer(coder[:, :, None, None], None, like),
        )  # fmt: skip
    decoder = conv_layer(f.dec * gain, None, like)
    layer2 = conv_layer(f.l2_w, f.l2_b, like)
    if f.kc == f.k:
        layer1 = conv_layer(torch.cat([f.enc_w, f.l1_w]), torch.cat([f.enc_b, f.l1_b]), like)
        return FastBlock(layer1, base_activation(f.act), layer2, f.final, decoder=decoder, coder_channels=f.cc)
    return FastBlock(
        conv_layer(f.l1_w, f.l1_b, like), base_activation(f.act), layer2, f.final,
        encoder=conv_layer(f.enc_w, f.enc_b, like), decoder=decoder,
    )  # fmt: skip


def _plain(f: _Folded) -> nn.Sequential:
    k1 = max(f.k, f.kc)
    enc = pad_kernel(f.enc_w, k1)
    layer1 = conv_layer(torch.cat([pad_kernel(f.l1_w, k1), enc, -enc]), torch.cat([f.l1_b, f.enc_b, -f.enc_b]), f.like)
    k2 = max(f.l2_w.shape[-1], f.kc)
    dec = pad_kernel(f.dec * f.act.scale, k2)  # base(v) - base(-v) = q v: with the scale, the gain
    layer2 = conv_layer(torch.cat([pad_kernel(f.l2_w, k2), dec, -dec], dim=1), f.l2_b, f.like)
    layers = [layer1, base_activation(f.act), layer2]
    return nn.Sequential(*layers, *([] if isinstance(f.final, nn.Identity) else [f.final]))


def reparameterize_conv(block: PNNHConv2d, form: str = "fast") -> nn.Module:
    """``block`` (in eval mode) as plain torch.nn layers computing the same function; see :mod:`.conv`."""
    folded = _Folded(block)
    return _fast(folded) if form == "fast" else _plain(folded)
