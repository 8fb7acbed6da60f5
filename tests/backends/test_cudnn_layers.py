"""The 'cuda' op's cuDNN-fused graphs (backends/cuda/cudnn_layers.py), checked on the CPU: cuDNN's graphs are
replaced by the same math in PyTorch ops (conv of act(x * scale + bias) and the output's channel sums;
dgrad -> dAct -> BN backward weight with the input-gradient coefficients) and the op's other passes by the
test-only CPU passes of the 'cuda' op. What is checked is the op's side: which layers
it sends to cuDNN, the folded BN affine, the statistics taken from the epilogue sums, and that the
results (outputs, every gradient, running statistics) match the reference. test_cudnn_fused.py checks
cuDNN's own graphs against PyTorch on a GPU."""

import pytest
import torch
import torch.nn.functional as F
from cuda_passes_on_cpu import run_cuda_op_on_cpu_kernels
from helpers import BLOCK_CASES, assert_matches_reference, randomize_norms, twin

import pnnh_kernels as pk
from pnnh_kernels._extension import extension_error
from pnnh_kernels.backends.contract import block_args
from pnnh_kernels.backends.cpu import CpuBackend
from pnnh_kernels.backends.cuda import cudnn_fused, cudnn_layers
from pnnh_kernels.backends.cuda.conv import conv_block as cuda_conv_block
from pnnh_kernels.backends.cuda.maps import FeatureMaps

pytestmark = pytest.mark.skipif(extension_error() is not None, reason=f"C++ extension unavailable: {extension_error()}")


class FakeCudnn:
    """Stands in for cuDNN's graphs: records each call's (prologue, slope), answers support with
    ``refusal`` ('' = supported)."""

    def __init__(self) -> None:
        self.calls: list[tuple[bool, float]] = []
        self.dgrad_calls = 0
        self.refusal = ""

    def support_on(self, device, x_shape, w_shape, dtype, *, prologue, slope=0.0, backward=False) -> str:
        return self.refusal

    def dgrad_drelu_dbn(self, dy, w, x, mean, invstd, gamma, beta, slope=0.0):
        """The graph's outputs as their documentation reads (csrc/cuda/cudnn_fused.h): d_act = dgrad(dy, w) *
        act'(BN(x)), BN's parameter gradients, dx = eq_scale_dy * d_act + eq_scale_x * x + eq_bias."""
        assert all(t.is_contiguous(memory_format=torch.channels_last) for t in (dy, w, x))
        self.dgrad_calls += 1
        view = (1, -1, 1, 1)
        mean, invstd, gamma, beta = (t.to(x.dtype).view(view) for t in (mean, invstd, gamma, beta))
        dgrad = torch.nn.grad.conv2d_input(x.shape, w, dy, padding=w.shape[-1] // 2)
        xhat = (x - mean) * invstd
        d_act = dgrad * torch.where(xhat * gamma + beta > 0, x.new_ones(()), x.new_full((), slope))
        count = x.numel() // x.shape[1]
        dbeta, dgamma = d_act.sum((0, 2, 3)), (d_act * xhat).sum((0, 2, 3))
        k = (gamma * invstd).view(-1)
        eq_x = -k * invstd.view(-1) * dgamma / count
        eq_bias = -k * dbeta / count - eq_x * mean.view(-1)
        d_act = d_act.contiguous(memory_format=torch.channels_last)
        return cudnn_fused.DgradBn(d_act, dgamma, dbeta, k, eq_x, eq_bias)

    def conv_genstats(self, x, w, scale=None, bias=None, slope=0.0):
        assert x.is_contiguous(memory_format=torch.channels_last) and w.is_contiguous(memory_format=torch.channels_last)
        self.calls.append((scale is not None, slope))
        view = (1, -1, 1, 1)
        inp = (
            x if scale is None else F.leaky_relu(x * scale.view(view).to(x.dtype) + bias.view(view).to(x.dtype), slope)
        )
        y = F.conv2d(inp, w, padding=w.shape[-1] // 2).contiguous(memory_format=torch.channels_last)
        # cuDNN sums in float32; float64 here keeps the comparison with the float64 reference tight
        return cudnn_fused.ConvStats(y, y.double().sum((0, 2, 3)), y.double().square().sum((0, 2, 3)))


@pytest.fixture
def fake(monkeypatch):
    fake = FakeCudnn()
    run_cuda_op_on_cpu_kernels(monkeypatch)
    monkeypatch.setattr(CpuBackend, "conv_op", lambda self: cuda_conv_block)
    monkeypatch.setattr(cudnn_fused, "support_on", fake.support_on)
    monkeypatch.setattr(cudnn_fused, "conv_genstats", fake.conv_genstats)
    monkeypatch.setattr(cudnn_fused, "dgrad_drelu_dbn", fake.dgrad_drelu_dbn)
    yield fake
    cudnn_layers.set_cudnn_fusion(None)


def _learner_fuses(options: dict) -> bool:
    """Layer 2's learner graphs apply: a learner tensor of its own, a positive activation scale."""
    separate = options.get("coder_kernel_size", 1) != options.get("kernel_size", 3)
    return separate and options.get("activation_scale", 1.0) > 0


def _expected_calls(options: dict, training: bool) -> list[bool]:
    """The prologue flag of each cuDNN call of one forward: layer 1 (training), layer 2."""
    return [False] * training + [True] * _learner_fuses(options)


def _pair(options: dict, training: bool):
    ref = pk.PNNHConv2d(5, backend="reference", **options).double().train(training)
    randomize_norms(ref)
    x = torch.randn(3, 5, 7, 6, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    return ref, twin(ref, "cpu"), x


@pytest.mark.parametrize("case", sorted(BLOCK_CASES))
@pytest.mark.parametrize("training", [True, False])
def test_fused_forward_matches_the_reference(fake, case, training):
    ref, fused, x = _pair(BLOCK_CASES[case], training)
    assert_matches_reference(ref, fused, x)
    expected = _expected_calls(BLOCK_CASES[case], training)
    assert [prologue for prologue, _ in fake.calls[: len(expected)]] == expected
    assert len(fake.calls) % max(len(expected), 1) == 0
    steps = len(fake.calls) // max(len(expected), 1)
    assert fake.dgrad_calls == (steps if training and _learner_fuses(BLOCK_CASES[case]) else 0)


def test_the_prologue_gets_the_activations_slope_and_a_negative_scale_is_not_fused(fake):
    options = dict(activation="leaky_relu", negative_slope=0.2, activation_scale=1.3)
    ref, fused, x = _pair(options, True)
    fused(x)
    assert fake.calls == [(False, 0.0), (True, pytest.approx(0.2))]
    fake.calls.clear()
    ref, fused, x = _pair(dict(options, activation_scale=-1.3), True)
    assert_matches_reference(ref, fused, x)
    assert {prologue for prologue, _ in fake.calls} == {False}


def test_bfloat16_keeps_its_statistics_out_of_the_float32_epilogue(fake):
    """cuDNN's epilogue sums squares in float32, which bfloat16 activations can overflow: bfloat16 takes
    only the layer-2 prologue (no statistics)."""
    plans = {}
    for dtype in (torch.float16, torch.bfloat16):
        block = pk.PNNHConv2d(5).to(dtype)
        x = torch.randn(3, 5, 7, 6, dtype=dtype).contiguous(memory_format=torch.channels_last)
        a = block_args(x, block.block_weights(), block.block_norms(), block.config)
        maps = FeatureMaps(a)
        plans[dtype] = cudnn_layers.plan_fusion(a, maps, tuple(a.learner1.shape))
        assert cudnn_layers.fuses_layer2_backward(a, maps)
    assert plans == {
        torch.float16: cudnn_layers.FusionPlan(layer1_stats=True, layer2_prologue=True),
        torch.bfloat16: cudnn_layers.FusionPlan(layer1_stats=False, layer2_prologue=True),
    }


def test_nchw_input_refused_support_and_the_switch_keep_the_separate_passes(fake):
    ref, fused, x = _pair({}, True)
    assert_matches_reference(ref, fused, x.contiguous())
    assert fake.calls == []
    fake.refusal = "no engine"
    assert_matches_reference(ref, fused, x)
    assert fake.calls == []
    fake.refusal = ""
    cudnn_layers.set_cudnn_fusion(False)
    fused(x)
    assert fake.calls == []
    cudnn_layers.set_cudnn_fusion(True)
    fused(x)
    assert fake.calls != []


def test_the_real_support_refuses_cpu_tensors_and_float32(monkeypatch):
    shape, w = (2, 8, 4, 4), (8, 8, 3, 3)
    assert "CUDA" in cudnn_fused.support_on(torch.device("cpu"), shape, w, torch.float16, prologue=False)
    assert "float16" in cudnn_fused.support_on(torch.device("cuda"), shape, w, torch.float32, prologue=False)


def test_the_environment_switch(monkeypatch):
    monkeypatch.setenv("PNNH_CUDNN_FUSION", "0")
    assert not cudnn_layers.cudnn_fusion_enabled()
    monkeypatch.setenv("PNNH_CUDNN_FUSION", "1")
    assert cudnn_layers.cudnn_fusion_enabled()
