"""Graph-safe ops: a block's forward + backward reads nothing back to the host and allocates nothing by
value, on every backend (what CUDA-graph capture and torch.compile's reduce-overhead mode need); and the
fused backends launch no more kernels than eager does for the same block (launches are what a small
block's GPU step is bound by). Counted on the CPU: aten ops, and Triton launches in the interpreter."""

import pytest
import torch
from helpers import assert_matches_reference, gpu_exact_math, twin
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
BLOCKS = {  # 70 pixels: two of the Triton interpreter's 64-row tiles
    "conv": (lambda: pk.PNNHConv2d(8), (2, 8, 7, 5)),
    "conv_coder_3x3": (lambda: pk.PNNHConv2d(8, coder_kernel_size=3), (2, 8, 7, 5)),
    "linear": (lambda: pk.PNNHLinear(8), (24, 8)),
}


@pytest.mark.parametrize("block", sorted(BLOCKS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_no_host_sync_in_forward_and_backward(backend, block):
    make, shape = BLOCKS[block]
    rec = training_step(twin(make(), backend), torch.randn(shape))
    assert rec.syncs == {}, rec.syncs
    assert rec.launches > 0  # the recording saw the step


GPU_BACKENDS = ["eager", "cuda", "triton"]
gpu = pytest.mark.skipif(not torch.cuda.is_available() or interpreting(), reason="needs a CUDA device")


def _gpu_step(module: torch.nn.Module, backend: str, x: torch.Tensor) -> torch.nn.Module:
    block = twin(module, backend).cuda()
    if pk.backends.refusal_reason(
        pk.backends.registered_backends()[backend],
        "linear" if x.dim() == 2 else "conv2d",
        x.cuda(),
        block.block_weights(),
        block.config,
    ):
        pytest.skip(f"{backend} does not serve this block here")
    return block


@gpu
@pytest.mark.parametrize("block", sorted(BLOCKS))
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_no_host_sync_on_the_gpu(backend, block):
    make, shape = BLOCKS[block]
    x = torch.randn(shape, device="cuda")
    rec = training_step(_gpu_step(make(), backend, x), x)
    assert rec.syncs == {}, rec.syncs


def _cuda_kernels(block: torch.nn.Module, x: torch.Tensor) -> int:
    """CUDA kernels one forward + backward launches (after a warm-up step), from the profiler."""
    x = x.detach().requires_grad_()
    block(x).sum().backward()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        block(x).sum().backward()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


@gpu
@pytest.mark.parametrize("block", sorted(BLOCKS))
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_fused_backends_launch_no_more_cuda_kernels_than_eager(backend, block):
    make, shape = BLOCKS[block]
    module = make()
    x = torch.randn(shape, device="cuda")
    fused = _cuda_kernels(_gpu_step(module, backend, x), x)
    eager = _cuda_kernels(twin(module, "eager").cuda(), x)
    assert fused <= eager, (fused, eager)


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


def _reduce_overhead_agrees(backend: str, device: str, dtype: torch.dtype) -> None:
    block = pk.PNNHConv2d(4, backend=backend).to(device=device, dtype=dtype).train()
    compiled = torch.compile(block, mode="reduce-overhead", fullgraph=True)
    x = torch.randn(2, 4, 5, 5, device=device, dtype=dtype)
    assert_matches_reference(twin(block, "reference"), compiled, x, steps=3)


@pytest.mark.slow
@pytest.mark.skipif(extension_error() is not None, reason="no C++ extension")
def test_reduce_overhead_compile_of_the_cpu_backend():
    # inductor with its reduce-overhead mode (CUDA graphs on a GPU) takes the fused custom ops whole
    _reduce_overhead_agrees("cpu", "cpu", torch.float64)


@gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_reduce_overhead_compile_captures_the_fused_backends_in_cuda_graphs(backend):
    gpu_exact_math()  # the reference's convolutions without TF32, for the float32 tolerance
    _reduce_overhead_agrees(backend, "cuda", torch.float32)
