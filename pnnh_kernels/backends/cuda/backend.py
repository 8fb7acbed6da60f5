"""The 'cuda' backend: PNNHConv2d with the extension's CUDA kernels (fused batch-norm statistics,
BN-apply + activation, fused dReLU + dBN in backward) around cuDNN convolutions and cuBLAS GEMMs
(the 1x1 decoder accumulates into layer 2's output tile in place): :mod:`.conv`.

PNNHLinear is not served here (the 'triton' backend or 'eager' computes it).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..._extension import extension, extension_error
from ...block import BlockConfig, BlockWeights
from ..contract import BlockOp
from ..fused import ExtensionBackend


class CudaBackend(ExtensionBackend):
    """Fused CUDA passes + cuDNN/cuBLAS GEMMs, float32/float16/bfloat16, batch norm, the scaled leaky family."""

    name = "cuda"
    device_types = ("cuda",)
    priority = 20
    dtypes = (torch.float32, torch.float16, torch.bfloat16)
    serves_autocast = True

    def unavailable_reason(self) -> Optional[str]:
        reason = extension_error()
        if reason:
            return reason
        if not getattr(extension(), "with_cuda", False):
            return "the extension was built without CUDA (torch had no CUDA, or no toolkit was found at install)"
        return None

    def conv_op(self) -> BlockOp:
        from .conv import conv_block

        return conv_block

    def unsupported_reason(self, op: str, x: Tensor, weights: BlockWeights, config: BlockConfig) -> Optional[str]:
        if op == "linear":
            return "the cuda backend serves PNNHConv2d only; PNNHLinear runs on 'triton' or 'eager'"
        return super().unsupported_reason(op, x, weights, config)

    def auto_skip_reason(self, op: str, x: Tensor, weights: BlockWeights, config: BlockConfig) -> Optional[str]:
        # benchmarks/RESULTS.md (H100): 0.2-0.8x of eager, 2x eager's kernel launches
        return "measured slower than 'eager' on an H100 (benchmarks/RESULTS.md)"
