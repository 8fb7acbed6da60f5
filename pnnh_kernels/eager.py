"""The algebraic PNNH block in plain PyTorch: the speed baseline every fused backend must beat.

It never materialises the signed coder copies. Since ``act(a) - act(-a) = g * a`` (see
:mod:`pnnh_kernels.activation`), layer 2's pre-activation is

    g * decode(z_c) + layer2(act(z_l); W_2)

and layer 1 reads ``x`` once through the encoder and learner weights concatenated along the output
channels (when their kernel sizes agree). Everything runs on cuDNN / oneDNN through ATen.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .block import BlockConfig, BlockNorms, BlockWeights, decoder_linear_weight, same_padding
from .norm import normalize


def _cat_bias(a: Optional[Tensor], b: Optional[Tensor], a_len: int, b_len: int, like: Tensor) -> Optional[Tensor]:
    if a is None and b is None:
        return None
    a = a if a is not None else like.new_zeros(a_len)
    b = b if b is not None else like.new_zeros(b_len)
    return torch.cat([a, b])


def _layer1_conv(x: Tensor, w: BlockWeights) -> tuple[Tensor, Tensor]:
    kc, k = w.encoder.shape[-1], w.learner1.shape[-1]
    if kc != k:
        return (
            F.conv2d(x, w.encoder, w.encoder_bias, padding=same_padding(kc)),
            F.conv2d(x, w.learner1, w.learner1_bias, padding=same_padding(k)),
        )
    cc, hid = w.encoder.shape[0], w.learner1.shape[0]
    bias = _cat_bias(w.encoder_bias, w.learner1_bias, cc, hid, w.encoder)
    z = F.conv2d(x, torch.cat([w.encoder, w.learner1]), bias, padding=same_padding(k))
    return z[:, :cc], z[:, cc:]


def conv_block_eager(
    x: Tensor, weights: BlockWeights, norms: BlockNorms, config: BlockConfig, training: bool
) -> Tensor:
    """Algebraic PNNH conv block; same function as :func:`conv_block_reference`."""
    act = config.activation
    z_c, z_l = _layer1_conv(x, weights)
    z_c = normalize(z_c, norms.coder, config, training, channel_last=False)
    a_l = act(normalize(z_l, norms.learner, config, training, channel_last=False))

    kc = weights.encoder.shape[-1]
    if weights.decoder is None:
        decoded = F.conv_transpose2d(z_c, weights.encoder, padding=same_padding(kc))
    else:
        decoded = F.conv2d(z_c, weights.decoder, padding=same_padding(kc))
    u = F.conv2d(a_l, weights.learner2, weights.learner2_bias, padding=same_padding(weights.learner2.shape[-1]))
    u = u.add_(decoded, alpha=act.coder_gain)
    y = normalize(u, norms.out, config, training, channel_last=False)
    return act(y) if config.final_activation else y


def linear_block_eager(
    x: Tensor, weights: BlockWeights, norms: BlockNorms, config: BlockConfig, training: bool
) -> Tensor:
    """Algebraic PNNH linear block; same function as :func:`linear_block_reference`."""
    act = config.activation
    cc, hid = weights.encoder.shape[0], weights.learner1.shape[0]
    bias = _cat_bias(weights.encoder_bias, weights.learner1_bias, cc, hid, weights.encoder)
    z = F.linear(x, torch.cat([weights.encoder, weights.learner1]), bias)
    z_c = normalize(z[..., :cc], norms.coder, config, training, channel_last=True)
    a_l = act(normalize(z[..., cc:], norms.learner, config, training, channel_last=True))
    # one GEMM for layer 2: [g * z_c, a_l] against [W_d, W_2]
    w2 = torch.cat([decoder_linear_weight(weights) * act.coder_gain, weights.learner2], dim=1)
    u = F.linear(torch.cat([z_c, a_l], dim=-1), w2, weights.learner2_bias)
    y = normalize(u, norms.out, config, training, channel_last=True)
    return act(y) if config.final_activation else y
