"""The 'triton' backend: PNNHConv2d on the Triton kernels (:mod:`.conv`): implicit-GEMM convolutions
with the BN-apply + activation prologue, statistics epilogues and the dual-path GEMM; PNNHLinear
(:mod:`.linear`): products with the layer-norm + activation prologue and row-statistics epilogues.

On CUDA tensors it compiles the kernels; on CPU tensors it runs only under ``TRITON_INTERPRET=1``
(the interpreter: how the tests check the kernels without a GPU; far too slow for real work, so
``auto`` never picks it there).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from typing import Optional

import torch
from torch import Tensor

from ...block import BlockConfig, BlockWeights
from ..contract import BlockOp
from ..fused import FusedBackend


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


class TritonBackend(FusedBackend):
    """Triton kernels, float32/float16/bfloat16 (and float64 in the interpreter): PNNHConv2d with batch norm
    and the scaled leaky family, PNNHLinear with layer norm and the scaled leaky family or GELU."""

    name = "triton"
    device_types = ("cuda", "cpu")
    priority = 15
    dtypes = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
    serves_autocast = True

    def unavailable_reason(self) -> Optional[str]:
        if importlib.util.find_spec("triton") is None:
            return "triton is not installed (pip install 'pnnh_kernels[triton]')"
        return None

    def conv_op(self) -> BlockOp:
        from .conv import conv_block  # imports triton: only when used

        return conv_block

    def linear_op(self) -> BlockOp:
        from .linear import linear_block  # imports triton: only when used

        return linear_block

    def register_ops(self) -> None:
        if self.unavailable_reason() is not None:  # without triton there is nothing of this backend to load
            return
        # a broken triton install, or the kernels outside the package (a source tree): importing pnnh_kernels
        # must not fail for it; using the backend says what is wrong
        with contextlib.suppress(ImportError):
            super().register_ops()

    def unsupported_reason(self, op: str, x: Tensor, weights: BlockWeights, config: BlockConfig) -> Optional[str]:
        if x.device.type == "cpu" and not _interpreting():
            return "the triton backend runs on CPU tensors only under TRITON_INTERPRET=1 (the interpreter, for tests)"
        if x.device.type == "cuda" and x.dtype == torch.float64:
            return "the triton backend has no float64 on a GPU (Triton's tl.dot does not take it there)"
        return super().unsupported_reason(op, x, weights, config)

    def benchmarkable(self, x: Tensor) -> bool:
        return x.device.type != "cpu"  # the interpreter: seconds per call, never a contender

    def auto_skip_reason(self, op: str, x: Tensor, weights: BlockWeights, config: BlockConfig) -> Optional[str]:
        if x.device.type == "cpu":
            return "the Triton interpreter is for tests, not speed"
        if op == "linear":
            return "the triton PNNHLinear has not been timed on a GPU yet"
        # benchmarks/RESULTS.md (H100): 0.2-0.7x of eager, launch-bound; not auto's pick yet
        return "measured slower than 'eager' on an H100 (benchmarks/RESULTS.md)"
