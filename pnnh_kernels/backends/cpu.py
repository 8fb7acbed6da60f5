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

    # Forward+backward, interleaved against eager (benchmarks/RESULTS.md, 2-core Xeon, fp32): 0.77-0.94x
    # at 32k-65k input elements, where the block's fixed Python cost dominates; 1.08x at 262k
    # (64x64x8x8); 1.14-1.48x from 524k up (the CIFAR stages at batch 128).
    TRAINING_MIN_ELEMENTS = 1 << 18

    def auto_skip_reason(self, op, x, weights, config) -> Optional[str]:
        if op == "linear":
            return "measured at 0.8-1.0x of 'eager' (the GEMMs dominate; benchmarks/RESULTS.md)"
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or weights.encoder.requires_grad)
        if not needs_grad:
            return None
        if weights.encoder.shape[-1] != 1:
            return "a k x k coder is not measured faster than 'eager' when a backward pass follows"
        if x.numel() < self.TRAINING_MIN_ELEMENTS:
            return f"input below {self.TRAINING_MIN_ELEMENTS} elements: the fixed cost per call outweighs the fused passes in training"
        return None

    def linear(self, x: Tensor, weights: BlockWeights, norms: BlockNorms, config: BlockConfig, training: bool) -> Tensor:
        act = config.activation
        affine = self._affine_params(weights, norms, x)
        rows = x.reshape(-1, x.shape[-1]).contiguous()
        y = linear_block_cpu(
            rows, weights.encoder, weights.learner1, weights.learner2, weights.decoder, *(t.contiguous() for t in affine),
            config.eps, activation_kind(act.kind), act.slope, act.scale, act.coder_gain, config.final_activation,
        )[0]
        return y.reshape(*x.shape[:-1], y.shape[-1])
