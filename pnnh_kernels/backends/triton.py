"""The 'triton' backend: PNNHConv2d on the Triton kernels (:mod:`.triton_conv_op`): implicit-GEMM
convolutions with the BN-apply + activation prologue, statistics epilogues and the dual-path GEMM.

On CUDA tensors it compiles the kernels; on CPU tensors it runs only under ``TRITON_INTERPRET=1``
(the interpreter: how the tests check the kernels without a GPU; far too slow for real work, so
``auto`` never picks it there).
"""
from __future__ import annotations

import importlib.util
from typing import Optional

import torch

from .fused_backend import FusedConvBackend


def _interpreting() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


class TritonBackend(FusedConvBackend):
    """Triton kernels, float32/float16/bfloat16 (and float64 in the interpreter), batch norm, the scaled leaky family."""

    name = "triton"
    device_types = ("cuda", "cpu")
    priority = 15
    dtypes = (torch.float32, torch.float64, torch.float16, torch.bfloat16)

    def unavailable_reason(self) -> Optional[str]:
        if importlib.util.find_spec("triton") is None:
            return "triton is not installed (pip install 'pnnh_kernels[triton]')"
        return None

    def unsupported_reason(self, op, x, weights, config) -> Optional[str]:
        if op == "linear":
            return "the triton backend serves PNNHConv2d only (PNNHLinear runs on 'eager')"
        if x.device.type == "cpu" and not _interpreting():
            return "the triton backend runs on CPU tensors only under TRITON_INTERPRET=1 (the interpreter, for tests)"
        if x.device.type == "cuda" and x.dtype == torch.float64:
            return "the triton backend has no float64 on a GPU (Triton's tl.dot does not take it there)"
        return super().unsupported_reason(op, x, weights, config)

    def auto_skip_reason(self, op, x, weights, config) -> Optional[str]:
        if x.device.type == "cpu":
            return "the Triton interpreter is for tests, not speed"
        # benchmarks/RESULTS.md (H100, 2026-11-23): 0.2-0.7x of eager, launch-bound; not auto's pick yet
        return "measured slower than 'eager' on an H100 (benchmarks/RESULTS.md)"

    def conv_op(self):
        from .triton_conv_op import ConvBlockTritonFunction, conv_block_triton  # imports triton: only when used

        return conv_block_triton, ConvBlockTritonFunction

    def linear(self, x, weights, norms, config, training):
        raise NotImplementedError("the triton backend serves PNNHConv2d only")
