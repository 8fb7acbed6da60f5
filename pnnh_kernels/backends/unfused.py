"""The two unfused, pure-PyTorch backends: 'reference' (literal, the oracle) and 'eager' (algebraic)."""

from __future__ import annotations

from ..eager import conv_block_eager, linear_block_eager
from ..reference import conv_block_reference, linear_block_reference
from .base import Backend

_ANY_DEVICE = ("cpu", "cuda", "mps", "xpu", "meta")


class ReferenceBackend(Backend):
    """Materialises the signed coder copies: slow, obviously right, runs anywhere."""

    name = "reference"
    device_types = _ANY_DEVICE

    def conv2d(self, x, weights, norms, config, training):
        return conv_block_reference(x, weights, norms, config, training)

    def linear(self, x, weights, norms, config, training):
        return linear_block_reference(x, weights, norms, config, training)


class EagerBackend(Backend):
    """The algebraic block in ATen ops: the fallback of ``auto`` and the baseline of the benchmarks."""

    name = "eager"
    device_types = _ANY_DEVICE

    def conv2d(self, x, weights, norms, config, training):
        return conv_block_eager(x, weights, norms, config, training)

    def linear(self, x, weights, norms, config, training):
        return linear_block_eager(x, weights, norms, config, training)
