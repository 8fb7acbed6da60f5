"""The C++ 'cpu' backend against the reference: outputs, every gradient, running statistics, gradcheck,
odd shapes and layouts, the custom ops' registration (opcheck, torch.compile), auto-selection, refusals."""
import copy

import pytest
import torch

import pnnh_kernels as pk
from helpers import BLOCK_CASES, TOLERANCES, assert_modules_agree, block_gradcheck, conv_op_args, randomize_norms, twin
from pnnh_kernels._extension import extension, extension_error
from pnnh_kernels.backends import fused_conv_op
from pnnh_kernels.backends.registry import select_backend

pytestmark = pytest.mark.skipif(extension_error() is not None, reason=f"C++ extension unavailable: {extension_error()}")

CASES = BLOCK_CASES


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cpu_backend_matches_reference(case, training, dtype):
    ref = pk.PNNHConv2d(5, backend="reference", **CASES[case]).to(dtype).train(training)
    randomize_norms(ref)
    fused = twin(ref, "cpu")
    assert_modules_agree(ref, fused, torch.randn(3, 5, 7, 6, dtype=dtype), *TOLERANCES[dtype])


@pytest.mark.parametrize("shape", [(1, 6, 7, 7), (2, 6, 1, 1), (3, 6, 13, 1), (1, 6, 2, 13)], ids=["batch1", "1x1", "column", "row"])
def test_cpu_backend_odd_shapes(shape):
    ref = pk.PNNHConv2d(6, backend="reference").double()
    assert_modules_agree(ref, twin(ref, "cpu"), torch.randn(shape, dtype=torch.float64), *TOLERANCES[torch.float64])


def test_cpu_backend_channels_last_and_strided_input():
    ref = pk.PNNHConv2d(6, backend="reference").double()
    randomize_norms(ref)
    fused = twin(ref, "cpu")
    strided = torch.randn(2, 12, 9, 10, dtype=torch.float64)[:, ::2, :, 1:]
    channels_last = torch.randn(2, 6, 9, 9, dtype=torch.float64).to(memory_format=torch.channels_last)
    for x in (strided, channels_last):
        assert_modules_agree(ref, fused, x, *TOLERANCES[torch.float64])
    assert fused(channels_last).is_contiguous(memory_format=torch.channels_last)


def test_cpu_backend_batch1_eval_uses_running_statistics():
    ref = pk.PNNHConv2d(4, backend="reference").double().eval()
    randomize_norms(ref)
    x = torch.randn(1, 4, 1, 1, dtype=torch.float64)
    torch.testing.assert_close(twin(ref, "cpu")(x), ref(x))


@pytest.mark.parametrize("options", [dict(), dict(tied=False, coder_kernel_size=3), dict(activation="leaky_relu", negative_slope=0.3)])
@pytest.mark.parametrize("training", [True, False])
def test_cpu_backend_gradcheck(options, training):
    block = pk.PNNHConv2d(3, hidden_channels=4, backend="cpu", **options).double().train(training)
    randomize_norms(block)
    assert block_gradcheck(block, torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True))


@pytest.mark.parametrize("options", [dict(), dict(coder_kernel_size=3), dict(tied=False)])
def test_custom_ops_pass_opcheck(options):
    block = pk.PNNHConv2d(4, **options).double()
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(fused_conv_op.conv_block_fused, conv_op_args(block, x))


@pytest.mark.slow
def test_torch_compile_traces_the_cpu_backend_without_graph_breaks():
    block = pk.PNNHConv2d(4, backend="cpu").double().train()
    reference = twin(block, "reference")
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    assert_modules_agree(reference, compiled, torch.randn(2, 4, 5, 5, dtype=torch.float64), *TOLERANCES[torch.float64], steps=1)


def test_auto_uses_cpu_for_inference_and_eager_for_training():
    block = pk.PNNHConv2d(4)
    x = torch.randn(2, 4, 3, 3)
    args = (x, block.block_weights(), block.config)
    assert select_backend("auto", "conv2d", *args).name == "eager"  # parameters need gradients
    with torch.no_grad():
        assert select_backend("auto", "conv2d", *args).name == "cpu"
    assert select_backend("auto", "linear", torch.randn(2, 4), pk.PNNHLinear(4).block_weights(), pk.PNNHLinear(4).config).name == "eager"


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: (pk.PNNHConv2d(4, backend="cpu", dtype=torch.bfloat16), torch.randn(2, 4, 3, 3, dtype=torch.bfloat16)), "float32/float64"),
        (lambda: (pk.PNNHConv2d(4, backend="cpu", norm="none"), torch.randn(2, 4, 3, 3)), "fuses batch norm"),
        (lambda: (pk.PNNHLinear(4, backend="cpu", norm="batch"), torch.randn(2, 4)), "fuses layer norm for PNNHLinear"),
        (lambda: (pk.PNNHLinear(4, backend="cpu", bias=True), torch.randn(2, 4)), "takes no linear biases"),
    ],
)
def test_cpu_backend_refuses_clearly(make, match):
    block, x = make()
    with pytest.raises(pk.BackendUnavailableError, match=match):
        block(x)


LINEAR_CASES = {
    "relu": dict(),
    "gelu_no_final": dict(activation="gelu", final_activation=False),
    "leaky_scaled": dict(activation="leaky_relu", negative_slope=0.2, activation_scale=1.4),
    "untied_out_ne_in": dict(tied=False, out_features=5),
    "narrow_coder": dict(coder_features=3),
}


@pytest.mark.parametrize("case", sorted(LINEAR_CASES))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cpu_linear_matches_reference(case, dtype):
    ref = pk.PNNHLinear(6, hidden_features=10, backend="reference", **LINEAR_CASES[case]).to(dtype)
    randomize_norms(ref)
    for shape in [(3, 4, 6), (1, 6), (6,)]:
        assert_modules_agree(ref, twin(ref, "cpu"), torch.randn(shape, dtype=dtype), *TOLERANCES[dtype])


def test_cpu_linear_gradcheck_and_opcheck():
    block = pk.PNNHLinear(4, hidden_features=5, activation="gelu", backend="cpu").double()
    randomize_norms(block)
    names = [n for n, _ in block.named_parameters()]

    def fn(x, *params):
        return torch.func.functional_call(block, dict(zip(names, params)), (x,))

    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(fn, (x, *block.parameters()))
    w, n = block.block_weights(), block.block_norms()
    args = (x, w.encoder, w.learner1, w.learner2, w.decoder, n.coder.weight, n.coder.bias, n.learner.weight,
            n.learner.bias, n.out.weight, n.out.bias, 1e-5, 1, 0.0, 1.0, 1.0, True)
    torch.library.opcheck(torch.ops.pnnh.linear_block_cpu.default, args)


def test_kernels_reject_bad_arguments():
    C = extension()
    z = torch.randn(2, 4, 5)
    with pytest.raises(RuntimeError, match="channel range out of bounds"):
        C.channel_sums(z, 2, 4)
    with pytest.raises(RuntimeError, match="contiguous"):
        C.channel_sums(z.transpose(0, 2), 0, 1)
    with pytest.raises(RuntimeError, match="data's dtype"):
        C.bn_act_apply(z, 0, torch.empty(2, 4, 5), torch.zeros(4, dtype=torch.float64), torch.ones(4), torch.ones(4), torch.zeros(4), True, 0.0, 1.0)


def test_channel_sums_match_torch():
    z = torch.randn(3, 7, 11, dtype=torch.float64)
    sums = extension().channel_sums(z, 2, 4)
    torch.testing.assert_close(sums[0], z[:, 2:6].sum((0, 2)))
    torch.testing.assert_close(sums[1], z[:, 2:6].pow(2).sum((0, 2)))
