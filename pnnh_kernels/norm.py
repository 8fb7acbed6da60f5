"""Normalisation as the pure-PyTorch backends apply it (batch norm, layer norm, or none)."""

from __future__ import annotations

from typing import Optional

import torch.nn.functional as F
from torch import Tensor

from .block import BlockConfig, NormParams


def uses_batch_statistics(params: Optional[NormParams], training: bool) -> bool:
    """Batch norm normalises with the batch's statistics in training, or when it keeps no running ones."""
    return training or params is None or params.running_mean is None


def normalize(
    z: Tensor, params: Optional[NormParams], config: BlockConfig, training: bool, *, channel_last: bool
) -> Tensor:
    """Apply ``config.norm`` to ``z``; channels are dim 1 (conv) or the last dim (``channel_last``)."""
    if config.norm == "none":
        return z
    assert params is not None, "a normalised block needs its NormParams"
    if config.norm == "layer":
        return F.layer_norm(z, (z.shape[-1],), params.weight, params.bias, config.eps)
    flat = z.reshape(-1, z.shape[-1]) if channel_last else z
    out = F.batch_norm(
        flat,
        params.running_mean,
        params.running_var,
        params.weight,
        params.bias,
        uses_batch_statistics(params, training),
        config.momentum,
        config.eps,
    )
    return out.reshape(z.shape) if channel_last else out
