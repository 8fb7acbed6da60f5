"""The 'cpu' backend: the PNNH block with the extension's C++ passes around oneDNN convolutions
(:mod:`.cpu_conv_op` for PNNHConv2d, on channels-last rows; :mod:`.cpu_linear` for PNNHLinear)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..block import BlockConfig, BlockNorms, BlockWeights
from .cpu_linear import activation_kind, linear_block_cpu
from .fused_backend import ExtensionConvBackend

class CpuBackend(ExtensionConvBackend):
    """Fused C++ passes + oneDNN convolutions, float32/float64, batch norm, the scaled leaky family."""

    name = "cpu"
    device_types = ("cpu",)
    priority = 10
    dtypes = (torch.float32, torch.float64)

    def conv_op(self):
        """The channels-last rows op (:mod:`.cpu_conv_op`): faster on the CPU than the planar one."""
        from .cpu_conv_op import ConvBlockRowsFunction, conv_block_rows

        return conv_block_rows, ConvBlockRowsFunction

    def auto_skip_reason(self, op, x, weights, config) -> Optional[str]:
        # benchmarks/RESULTS.md: both blocks are about even with eager on forward + backward on this CPU
        # (the convolutions / GEMMs, identical in both, are most of the time), not reliably faster
        if op == "linear":
            return "measured at 0.8-1.0x of 'eager' (the GEMMs dominate; benchmarks/RESULTS.md)"
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or weights.encoder.requires_grad)
        return "not reliably faster than 'eager' when a backward pass follows" if needs_grad else None

    def linear(self, x: Tensor, weights: BlockWeights, norms: BlockNorms, config: BlockConfig, training: bool) -> Tensor:
        act = config.activation
        affine = self._affine_params(weights, norms, x)
        rows = x.reshape(-1, x.shape[-1]).contiguous()
        y = linear_block_cpu(
            rows, weights.encoder, weights.learner1, weights.learner2, weights.decoder, *(t.contiguous() for t in affine),
            config.eps, activation_kind(act.kind), act.slope, act.scale, act.coder_gain, config.final_activation,
        )[0]
        return y.reshape(*x.shape[:-1], y.shape[-1])
