"""The things a benchmark compares: the PNNH block on each backend, and its baselines."""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

import pnnh_kernels as pk
from pnnh_kernels.backends import refusal_reason, registered_backends
from pnnh_kernels.eager import conv_block_eager, linear_block_eager
from pnnh_kernels.models.resnet import BasicBlock
from pnnh_kernels.reference import conv_block_reference, linear_block_reference

BASELINES = ("eager", "compile", "reference", "residual")


def fused_backends() -> list[str]:
    return [name for name, b in registered_backends().items() if b.fused]


def interpreted(name: str, device: str) -> bool:
    """Whether ``name`` would run on the Triton interpreter here (TRITON_INTERPRET=1 lets it take CPU
    tensors, for tests): a correctness tool, so timing it measures nothing worth recording."""
    return name == "triton" and device == "cpu"


def _compiled(fn):
    return torch.compile(fn, dynamic=False)


def conv_variant(name: str, channels: int, x: torch.Tensor) -> tuple[Optional[Callable], Optional[str]]:
    """(callable of x, None) or (None, why it cannot run here)."""
    block = pk.PNNHConv2d(channels).to(device=x.device, dtype=x.dtype).train()
    w, n, cfg = block.block_weights(), block.block_norms(), block.config
    if name == "eager":
        return (lambda t: conv_block_eager(t, w, n, cfg, True)), None
    if name == "compile":
        fn = _compiled(conv_block_eager)
        return (lambda t: fn(t, w, n, cfg, True)), None
    if name == "reference":
        return (lambda t: conv_block_reference(t, w, n, cfg, True)), None
    if name == "residual":  # a ResNet basic block of the same width: what the PNNH block replaces
        resnet = BasicBlock(channels, channels, 1, shortcut="A").to(device=x.device, dtype=x.dtype).train()
        if x.is_contiguous(memory_format=torch.channels_last):
            resnet = resnet.to(memory_format=torch.channels_last)
        return resnet, None
    reason = refusal_reason(registered_backends()[name], "conv2d", x, w, cfg)
    if reason:
        return None, reason
    return (lambda t: pk.pnnh_conv2d(t, w, n, cfg, training=True, backend=name)), None


class _TransformerMlp(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x):
        return self.fc2(torch.nn.functional.gelu(self.fc1(x)))


def linear_variant(name: str, dim: int, x: torch.Tensor) -> tuple[Optional[Callable], Optional[str]]:
    block = pk.PNNHLinear(dim, activation="gelu", final_activation=False).to(device=x.device, dtype=x.dtype).train()
    w, n, cfg = block.block_weights(), block.block_norms(), block.config
    if name == "eager":
        return (lambda t: linear_block_eager(t, w, n, cfg, True)), None
    if name == "compile":
        fn = _compiled(linear_block_eager)
        return (lambda t: fn(t, w, n, cfg, True)), None
    if name == "reference":
        return (lambda t: linear_block_reference(t, w, n, cfg, True)), None
    if name == "residual":  # the ViT MLP (fc1-GELU-fc2) of the same width
        return _TransformerMlp(dim).to(device=x.device, dtype=x.dtype), None
    reason = refusal_reason(registered_backends()[name], "linear", x, w, cfg)
    if reason:
        return None, reason
    return (lambda t: pk.pnnh_linear(t, w, n, cfg, training=True, backend=name)), None
