"""Functional forms of the PNNH blocks: validate, pick a backend, compute."""

from __future__ import annotations

from typing import Optional

from torch import Tensor

from .backends import choose_backend
from .block import NORMS_CONV, BlockConfig, BlockNorms, BlockWeights
from .validation import check_block_weights, check_conv_inputs, check_linear_inputs


def pnnh_conv2d(
    x: Tensor,
    weights: BlockWeights,
    norms: Optional[BlockNorms] = None,
    config: Optional[BlockConfig] = None,
    *,
    training: bool = False,
    backend: str = "auto",
) -> Tensor:
    """The PNNH conv block (stride 1, 'same' padding) on ``x`` of shape ``(N, C, H, W)``.

    In training with batch norm, the running statistics in ``norms`` are updated in place, as
    ``torch.nn.functional.batch_norm`` does.
    """
    norms = norms if norms is not None else BlockNorms()
    config = config if config is not None else BlockConfig()
    if config.norm not in NORMS_CONV:
        raise ValueError(f"PNNHConv2d norm must be one of {NORMS_CONV}, got {config.norm!r}")
    check_block_weights(weights, norms, config, conv=True)
    check_conv_inputs(x, weights, norms, config, training)
    chosen = choose_backend(backend, "conv2d", x, weights, norms, config, training)
    return chosen.conv2d(x, weights, norms, config, training)


def pnnh_linear(
    x: Tensor,
    weights: BlockWeights,
    norms: Optional[BlockNorms] = None,
    config: Optional[BlockConfig] = None,
    *,
    training: bool = False,
    backend: str = "auto",
) -> Tensor:
    """The PNNH block on the last dimension of ``x`` (the Transformer MLP form)."""
    norms = norms if norms is not None else BlockNorms()
    config = config if config is not None else BlockConfig(norm="layer")
    check_block_weights(weights, norms, config, conv=False)
    check_linear_inputs(x, weights, norms, config, training)
    chosen = choose_backend(backend, "linear", x, weights, norms, config, training)
    return chosen.linear(x, weights, norms, config, training)
