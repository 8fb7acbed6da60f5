"""The 'cpu' backend: the PNNH block with the extension's C++ passes around oneDNN convolutions
(:mod:`.conv` for PNNHConv2d, on channels-last rows; :mod:`.linear` for PNNHLinear)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ...block import BlockConfig, BlockWeights
from ..contract import BlockOp
from ..fused import ExtensionBackend


class CpuBackend(ExtensionBackend):
    """Fused C++ passes + oneDNN convolutions and GEMMs, float32/float64: PNNHConv2d with batch norm and the
    scaled leaky family, PNNHLinear with layer norm and the scaled leaky family or GELU."""

    name = "cpu"
    device_types = ("cpu",)
    priority = 10
    dtypes = (torch.float32, torch.float64)

    # Interleaved against eager, 2-core Xeon, fp32 (benchmarks/RESULTS.md). Conv forward+backward, one
    # block: 0.93-0.99x below 8k input elements, 1.0-1.06x at 32k-49k, 1.05-1.24x at 65k, 1.11-1.26x
    # from 131k up; a whole PNNH-56 training step 1.01x at 2x3x32x32 and 1.12-1.16x at the main job's
    # 64x3x8x8 (blocks of 16k-65k elements; 'cpu' for every block was 1.11-1.14x faster there than a
    # 2^16 threshold). PNNHLinear (GELU): forward+backward 0.90x at 1k elements, 1.09x at 75k (197x384),
    # 1.10-1.15x at 300k-600k; no-grad forward 0.76x, 1.04x, 1.15x.
    CONV_TRAINING_MIN_ELEMENTS = 1 << 12
    LINEAR_MIN_ELEMENTS = 1 << 16

    def conv_op(self) -> BlockOp:
        from .conv import conv_block

        return conv_block

    def linear_op(self) -> BlockOp:
        from .linear import linear_block

        return linear_block

    def linear_rows(self, x: Tensor) -> Tensor:
        return x.reshape(-1, x.shape[-1]).contiguous()  # the C++ passes read rows with unit stride

    def auto_skip_reason(self, op: str, x: Tensor, weights: BlockWeights, config: BlockConfig) -> Optional[str]:
        def small(limit: int) -> str:
            return f"input below {limit} elements: the fixed cost per call outweighs the fused passes"

        if op == "linear":
            return small(self.LINEAR_MIN_ELEMENTS) if x.numel() < self.LINEAR_MIN_ELEMENTS else None
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or weights.encoder.requires_grad)
        if not needs_grad:
            return None
        if weights.encoder.shape[-1] != 1:
            return "a k x k coder is not measured faster than 'eager' when a backward pass follows"
        if x.numel() < self.CONV_TRAINING_MIN_ELEMENTS:
            return small(self.CONV_TRAINING_MIN_ELEMENTS) + " in training"
        return None
