"""The literal PNNH block: the correctness oracle.

It materialises ``h = act([z_c, -z_c, z_l])`` with both signed copies of the coder and runs layer 2 as
one plain convolution (or linear map) with the weight ``[W_d, -W_d, W_2]``, exactly as the block's
definition writes it (:mod:`pnnh_kernels.block`, docs/DESIGN.md). Slow on purpose: nothing algebraic is assumed, so it checks everything else.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .block import (
    BlockConfig,
    BlockNorms,
    BlockWeights,
    decoder_conv_weight,
    decoder_linear_weight,
    pad_kernel,
    same_padding,
)
from .norm import normalize


def _signed_coder_input(z_c: Tensor, z_l: Tensor, config: BlockConfig, dim: int) -> Tensor:
    return config.activation(torch.cat([z_c, -z_c, z_l], dim=dim))


def _finish(u: Tensor, norms: BlockNorms, config: BlockConfig, training: bool, channel_last: bool) -> Tensor:
    y = normalize(u, norms.out, config, training, channel_last=channel_last)
    return config.activation(y) if config.final_activation else y


def conv_block_reference(
    x: Tensor, weights: BlockWeights, norms: BlockNorms, config: BlockConfig, training: bool
) -> Tensor:
    """Literal PNNH conv block on ``x`` of shape ``(N, C, H, W)``; stride 1, 'same' padding."""
    kc, k = weights.encoder.shape[-1], weights.learner1.shape[-1]
    z_c = F.conv2d(x, weights.encoder, weights.encoder_bias, padding=same_padding(kc))
    z_l = F.conv2d(x, weights.learner1, weights.learner1_bias, padding=same_padding(k))
    z_c = normalize(z_c, norms.coder, config, training, channel_last=False)
    z_l = normalize(z_l, norms.learner, config, training, channel_last=False)
    h = _signed_coder_input(z_c, z_l, config, dim=1)

    size = max(kc, k)  # one plain conv over h needs one kernel size: zero-pad the smaller one
    w_d = pad_kernel(decoder_conv_weight(weights), size)
    w_2 = pad_kernel(weights.learner2, size)
    u = F.conv2d(h, torch.cat([w_d, -w_d, w_2], dim=1), weights.learner2_bias, padding=same_padding(size))
    return _finish(u, norms, config, training, channel_last=False)


def linear_block_reference(
    x: Tensor, weights: BlockWeights, norms: BlockNorms, config: BlockConfig, training: bool
) -> Tensor:
    """Literal PNNH linear block on the last dimension of ``x``."""
    z_c = F.linear(x, weights.encoder, weights.encoder_bias)
    z_l = F.linear(x, weights.learner1, weights.learner1_bias)
    z_c = normalize(z_c, norms.coder, config, training, channel_last=True)
    z_l = normalize(z_l, norms.learner, config, training, channel_last=True)
    h = _signed_coder_input(z_c, z_l, config, dim=-1)
    w_d = decoder_linear_weight(weights)
    u = F.linear(h, torch.cat([w_d, -w_d, weights.learner2], dim=1), weights.learner2_bias)
    return _finish(u, norms, config, training, channel_last=True)
