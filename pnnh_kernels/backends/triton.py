"""The 'triton' backend: PNNHConv2d on the Triton kernels (:mod:`.triton_conv_op`): implicit-GEMM
convolutions with the BN-apply + activation prologue, statistics epilogues and the dual-path GEMM;
PNNHLinear (:mod:`.triton_linear_op`): products with the layer-norm + activation prologue and
row-statistics epilogues.

On CUDA tensors it compiles the kernels; on CPU tensors it runs only under ``TRITON_INTERPRET=1``
(the interpreter: how the tests check the kernels without a GPU; far too slow for real work, so
``auto`` never picks it there).
"""
from __future__ import annotations

import importlib.util
from typing import Optional

import torch
from torch import Tensor

from ..block import BlockConfig, BlockNorms, BlockWeights
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
        if x.device.type == "cpu" and not _interpreting():
            return "the triton backend runs on CPU tensors only under TRITON_INTERPRET=1 (the interpreter, for tests)"
        if x.device.type == "cuda" and x.dtype == torch.float64:
            return "the triton backend has no float64 on a GPU (Triton's tl.dot does not take it there)"
        return super().unsupported_reason(op, x, weights, config)

    def auto_skip_reason(self, op, x, weights, config) -> Optional[str]:
        if x.device.type == "cpu":
            return "the Triton interpreter is for tests, not speed"
        if op == "linear":  # checked in the interpreter only so far (no GPU session since it was written)
            return "the triton PNNHLinear has not been timed on a GPU yet"
        # benchmarks/RESULTS.md (H100, 2026-11-23): 0.2-0.7x of eager, launch-bound; not auto's pick yet
        return "measured slower than 'eager' on an H100 (benchmarks/RESULTS.md)"

    def conv_op(self):
        from .triton_conv_op import ConvBlockTritonFunction, conv_block_triton  # imports triton: only when used

        return conv_block_triton, ConvBlockTritonFunction

    def linear(self, x: Tensor, weights: BlockWeights, norms: BlockNorms, config: BlockConfig, training: bool) -> Tensor:
        from .triton_linear_op import LinearBlockTritonFunction, linear_block_triton  # imports triton: only when used

        act = config.activation
        affine = self._affine_params(weights, norms, x)
        rows = x.reshape(-1, x.shape[-1])
        run = linear_block_triton if torch.compiler.is_compiling() else LinearBlockTritonFunction.apply
        y = run(
            rows, weights.encoder, weights.learner1, weights.learner2, weights.decoder, *affine,
            config.eps, act.kind == "gelu", act.slope, act.scale, act.coder_gain, config.final_activation,
        )[0]
        return y.reshape(*x.shape[:-1], y.shape[-1])
