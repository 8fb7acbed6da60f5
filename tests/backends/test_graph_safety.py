"""Graph-safe ops: a block's forward + backward reads nothing back to the host and allocates nothing by
value, on every backend (what CUDA-graph capture and torch.compile's reduce-overhead mode need); and the
fused backends launch no more kernels than eager does for the same block (launches are what a small
block's GPU step is bound by). Counted on the CPU: aten ops, and Triton launches in the interpreter."""

import pytest
import torch
from helpers import twin
from op_recording import training_step
from triton_devices import interpreting

import pnnh_kernels as pk
from pnnh_kernels._extension import extension_error


@pytest.fixture(autouse=True)
def _no_finite_check():
    # the NaN/Inf input check reads a value back by design; it is off by default on GPUs and skipped
    # during CUDA-graph capture (tests/block/test_bad_input.py covers it)
    pk.set_finite_check(False)
    yield
    pk.set_finite_check(None)


BACKENDS = [
    "reference",
    "eager",
    pytest.param("cpu", marks=pytest.mark.skipif(extension_error() is not None, reason="no C++ extension")),
    pytest.param("triton", marks=pytest.mark.skipif(not interpreting(), reason="triton on CPU needs the interpreter")),
]
BLOCKS = {
    "conv": (lambda: pk.PNNHConv2d(8), (4, 8, 6, 6)),
    "conv_coder_3x3": (lambda: pk.PNNHConv2d(8, coder_kernel_size=3), (4, 8, 6, 6)),
    "linear": (lambda: pk.PNNHLinear(8), (24, 8)),
}


@pytest.mark.parametrize("block", sorted(BLOCKS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_no_host_sync_in_forward_and_backward(backend, block):
    make, shape = BLOCKS[block]
    rec = training_step(twin(make(), backend), torch.randn(shape))
    assert rec.syncs == {}, rec.syncs
    assert rec.launches > 0  # the recording saw the step


LAYOUTS = [
    (block, layout) for block in sorted(BLOCKS) for layout in ("nchw", "channels_last") if block.startswith("conv")
] + [("linear", "rows")]


@pytest.mark.skipif(not interpreting(), reason="counts Triton launches in the interpreter")
@pytest.mark.parametrize("block, layout", LAYOUTS)
def test_triton_launches_no_more_kernels_than_eager(block, layout):
    make, shape = BLOCKS[block]
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = torch.randn(shape)
    module = make()
    if layout != "rows":
        x, module = x.contiguous(memory_format=fmt), module.to(memory_format=fmt)
    eager = training_step(twin(module, "eager"), x)
    fused = training_step(twin(module, "triton"), x)
    assert fused.triton_launches > 0
    assert fused.launches <= eager.launches, (dict(fused.ops), fused.triton_launches, dict(eager.ops))
