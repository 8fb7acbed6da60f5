"""The 'cpu' backend's PNNHConv2d (backends/cpu/conv.py) against the reference: outputs, every gradient,
running statistics, gradcheck, odd shapes and layouts, the custom ops (opcheck, torch.compile), auto's
choice, refusals. The 'cuda' backend's op runs the same checks on test-only CPU versions of its passes."""

import copy

import pytest
import torch
from cuda_passes_on_cpu import run_cuda_op_on_cpu_kernels
from helpers import (
    BLOCK_CASES,
    TOLERANCES,
    assert_matches_reference,
    assert_modules_agree,
    block_gradcheck,
    op_args,
    randomize_norms,
    twin,
)
from torch.utils._python_dispatch import TorchDispatchMode

import pnnh_kernels as pk
from pnnh_kernels._extension import extension_error
from pnnh_kernels.backends.contract import BlockArgs
from pnnh_kernels.backends.cpu import CpuBackend
from pnnh_kernels.backends.cpu.conv import conv_block as cpu_conv_block
from pnnh_kernels.backends.cuda.conv import conv_block as cuda_conv_block
from pnnh_kernels.backends.registry import select_backend

pytestmark = pytest.mark.skipif(extension_error() is not None, reason=f"C++ extension unavailable: {extension_error()}")

CASES = BLOCK_CASES


@pytest.fixture(params=["cpu", "cuda"])
def cpu_op(request, monkeypatch):
    """The 'cpu' backend runs the channels-last rows op; the 'cuda' backend's op (in the input's layout)
    is checked here too, its Python half on test-only CPU versions of its passes."""
    if request.param == "cuda":
        run_cuda_op_on_cpu_kernels(monkeypatch)
        monkeypatch.setattr(CpuBackend, "conv_op", lambda self: cuda_conv_block)
    return request.param


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cpu_backend_matches_reference(case, training, dtype, cpu_op):
    ref = pk.PNNHConv2d(5, backend="reference", **CASES[case]).to(dtype).train(training)
    randomize_norms(ref)
    fused = twin(ref, "cpu")
    assert_matches_reference(ref, fused, torch.randn(3, 5, 7, 6, dtype=dtype))


@pytest.mark.parametrize(
    "shape", [(1, 6, 7, 7), (2, 6, 1, 1), (3, 6, 13, 1), (1, 6, 2, 13)], ids=["batch1", "1x1", "column", "row"]
)
def test_cpu_backend_odd_shapes(shape, cpu_op):
    ref = pk.PNNHConv2d(6, backend="reference").double()
    rtol, atol = TOLERANCES[torch.float64]
    if shape[0] * shape[2] * shape[3] <= 2:
        # batch norm over two values per channel: y is +-1 and every gradient a difference of O(1) terms,
        # so two correct orders of evaluation (the cpu op folds BN_c into the decoder) differ by ~1e-10
        atol = 1e-8
    assert_modules_agree(ref, twin(ref, "cpu"), torch.randn(shape, dtype=torch.float64), rtol, atol)


def test_cpu_backend_channels_last_and_strided_input(cpu_op):
    ref = pk.PNNHConv2d(6, backend="reference").double()
    randomize_norms(ref)
    fused = twin(ref, "cpu")
    strided = torch.randn(2, 12, 9, 10, dtype=torch.float64)[:, ::2, :, 1:]
    channels_last = torch.randn(2, 6, 9, 9, dtype=torch.float64).to(memory_format=torch.channels_last)
    for x in (strided, channels_last):
        assert_matches_reference(ref, fused, x)
    assert fused(channels_last).is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("options", [dict(), dict(tied=False), dict(coder_kernel_size=3)])
def test_cpu_backend_with_a_channels_last_model(options, cpu_op):
    """model.to(memory_format=channels_last), as the README advises on a CPU, makes the 4-D weights
    channels-last too; the weight gradients must still be right."""
    ref = pk.PNNHConv2d(6, backend="reference", **options).double()
    randomize_norms(ref)
    fused = twin(ref, "cpu").to(memory_format=torch.channels_last)
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in fused.parameters() if p.dim() == 4)
    x = torch.randn(3, 6, 5, 7, dtype=torch.float64).to(memory_format=torch.channels_last)
    assert_matches_reference(ref, fused, x)


@pytest.mark.parametrize("options", [dict(), dict(coder_kernel_size=3), dict(kernel_size=1)])
def test_cpu_backend_parameter_grads_without_input_grad(options, cpu_op):
    """A first layer: x needs no gradient, so the op skips dx (and the coder's in-place dx product)."""
    ref = pk.PNNHConv2d(5, backend="reference", **options).double()
    randomize_norms(ref)
    fused = twin(ref, "cpu")
    x = torch.randn(2, 5, 6, 7, dtype=torch.float64)
    for block in (ref, fused):
        block(x).square().sum().backward()
    for (name, p_ref), (_, p_fused) in zip(ref.named_parameters(), fused.named_parameters()):
        torch.testing.assert_close(p_fused.grad, p_ref.grad, rtol=1e-10, atol=1e-10, msg=lambda m: f"{name}: {m}")


def test_cpu_backend_batch1_eval_uses_running_statistics():
    ref = pk.PNNHConv2d(4, backend="reference").double().eval()
    randomize_norms(ref)
    x = torch.randn(1, 4, 1, 1, dtype=torch.float64)
    torch.testing.assert_close(twin(ref, "cpu")(x), ref(x))


@pytest.mark.parametrize(
    "options", [dict(), dict(tied=False, coder_kernel_size=3), dict(activation="leaky_relu", negative_slope=0.3)]
)
@pytest.mark.parametrize("training", [True, False])
def test_cpu_backend_gradcheck(options, training):
    block = pk.PNNHConv2d(3, hidden_channels=4, backend="cpu", **options).double().train(training)
    randomize_norms(block)
    assert block_gradcheck(block, torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True))


@pytest.mark.parametrize("options", [dict(), dict(coder_kernel_size=3), dict(tied=False), dict(kernel_size=1)])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_custom_ops_pass_opcheck(cpu_op, options, layout):
    op = (cpu_conv_block if cpu_op == "cpu" else cuda_conv_block).op
    block = pk.PNNHConv2d(4, **options).double()
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64).contiguous(memory_format=layout).requires_grad_()
    torch.library.opcheck(op, op_args(block, x))


class _Casts(TorchDispatchMode):
    """Records the shapes of the tensors an op converts to another dtype."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket.__name__ == "_to_copy" and args[0].dtype != out.dtype:
            self.shapes.append(tuple(out.shape))
        return out


@pytest.mark.parametrize("options", [dict(), dict(tied=False), dict(coder_kernel_size=3)])
def test_the_cuda_op_reuses_its_weight_casts_in_backward(options, monkeypatch):
    """Under autocast the 'cuda' op gets float32 weights beside low-precision data: forward's casts are
    kept for backward, which casts no weight again; the results are those of weights given in the data's
    dtype. On the CPU: float64 data beside float32 weights, on the 'cuda' op's CPU passes."""
    run_cuda_op_on_cpu_kernels(monkeypatch)
    block = pk.PNNHConv2d(4, **options)
    randomize_norms(block)
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    mixed = op_args(block, x.requires_grad_())
    y, record = cuda_conv_block(BlockArgs(*mixed))
    assert record.encoder_cast.dtype == torch.float64 and record.encoder_cast.shape == block.coder.encoder.shape
    weights = [t for t in mixed[1:5] if t is not None]
    casts = _Casts()
    with casts:
        grads = torch.autograd.grad(y.square().sum(), [x, *weights])
    # the weights' gradients go back to float32 (one conversion each); no weight is cast to float64 again
    weight_casts = [shape for shape in casts.shapes if len(shape) == 4]  # (the norms' vectors convert too here)
    assert sorted(weight_casts) == sorted(tuple(w.shape) for w in weights), casts.shapes
    assert all(g.dtype == torch.float32 for g in grads[1:])
    same = copy.deepcopy(block).double()
    y64, record64 = cuda_conv_block(BlockArgs(*op_args(same, x)))
    assert record64.encoder_cast.numel() == 0  # nothing cast, nothing kept
    weights64 = [t for t in op_args(same, x)[1:5] if t is not None]
    grads64 = torch.autograd.grad(y64.square().sum(), [x, *weights64])
    torch.testing.assert_close(y, y64)
    for g, g64 in zip(grads, grads64):
        torch.testing.assert_close(g.double(), g64, rtol=1e-6, atol=1e-6)
    torch.library.opcheck(cuda_conv_block.op, mixed)


@pytest.mark.slow
@pytest.mark.parametrize(
    "make, shape",
    [
        (lambda: pk.PNNHConv2d(4, backend="cpu"), (2, 4, 5, 5)),
        (lambda: pk.PNNHLinear(4, hidden_features=6, activation="gelu", backend="cpu"), (3, 4)),
    ],
    ids=["conv", "linear"],
)
def test_torch_compile_traces_the_cpu_backend_without_graph_breaks(make, shape):
    """Eager calls take an autograd.Function; under torch.compile the custom op must be what is traced."""
    block = make().double().train()
    reference = twin(block, "reference")
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    assert_matches_reference(reference, compiled, torch.randn(shape, dtype=torch.float64), steps=1)


def test_auto_uses_cpu_for_inference_and_for_training_large_maps():
    block = pk.PNNHConv2d(4)
    x = torch.randn(2, 4, 3, 3)
    args = (x, block.block_weights(), block.config)
    assert select_backend("auto", "conv2d", *args).name == "eager"  # a small map, parameters need gradients
    with torch.no_grad():
        assert select_backend("auto", "conv2d", *args).name == "cpu"
    large = torch.empty(4, 4, 16, 16)  # 4096 elements: the training threshold
    assert select_backend("auto", "conv2d", large, block.block_weights(), block.config).name == "cpu"
    below = torch.empty(4, 4, 16, 15)
    assert select_backend("auto", "conv2d", below, block.block_weights(), block.config).name == "eager"
    kxk = pk.PNNHConv2d(4, coder_kernel_size=3)
    assert select_backend("auto", "conv2d", large, kxk.block_weights(), kxk.config).name == "eager"
    linear = pk.PNNHLinear(64)
    args = (linear.block_weights(), linear.config)
    assert select_backend("auto", "linear", torch.randn(2, 64), *args).name == "eager"
    assert select_backend("auto", "linear", torch.empty(1024, 64), *args).name == "cpu"


@pytest.mark.parametrize(
    "make, match",
    [
        (
            lambda: (
                pk.PNNHConv2d(4, backend="cpu", dtype=torch.bfloat16),
                torch.randn(2, 4, 3, 3, dtype=torch.bfloat16),
            ),
            "float32/float64",
        ),
        (lambda: (pk.PNNHConv2d(4, backend="cpu", norm="none"), torch.randn(2, 4, 3, 3)), "fuses batch norm"),
        (lambda: (pk.PNNHLinear(4, backend="cpu", norm="batch"), torch.randn(2, 4)), "fuses layer norm for PNNHLinear"),
        (lambda: (pk.PNNHLinear(4, backend="cpu", bias=True), torch.randn(2, 4)), "takes no linear biases"),
    ],
)
def test_cpu_backend_refuses_clearly(make, match):
    block, x = make()
    with pytest.raises(pk.BackendUnavailableError, match=match):
        block(x)
