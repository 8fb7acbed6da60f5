"""The Triton kernels and the 'triton' backend against PyTorch and the reference.

On the CPU they run under ``TRITON_INTERPRET=1`` (how CI runs them; tiny shapes, the interpreter is
slow); on a CUDA machine without the interpreter they run compiled on the GPU. Kernel tests check each
kernel on its own (convolution as implicit GEMM in every layout / stride / padding, its weight gradient,
the fused prologue, the statistics epilogue, the row passes); block tests check outputs, every gradient
and the running statistics of the whole block against the literal reference.
"""
import importlib.util

import pytest
import torch
import torch.nn.functional as F

import pnnh_kernels as pk
from helpers import (
    BLOCK_CASES,
    TOLERANCES,
    assert_modules_agree,
    block_gradcheck,
    conv_op_args,
    low_precision_errors,
    randomize_norms,
    twin,
)

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)

from pnnh_kernels.backends.registry import BackendUnavailableError, select_backend  # noqa: E402
from pnnh_kernels.triton_kernels import (  # noqa: E402
    Prologue,
    bn_act_backward_apply,
    bn_act_backward_sums,
    bn_act_forward,
    conv2d_implicit_gemm,
    conv2d_weight_grad,
)
from pnnh_kernels.triton_kernels.bn_stats import bn_finalize  # noqa: E402
from pnnh_kernels.triton_kernels.conv_implicit_gemm import pack_input_grad_weight, pack_weight, unpack_weight  # noqa: E402
from triton_devices import ON_GPU, device, exact_dtype, requires_a_device  # noqa: E402,F401  (device: a fixture)

pytestmark = requires_a_device


def tolerance(device):
    return TOLERANCES[exact_dtype(device)]


def rows(t):
    """NCHW -> [N*H*W, C], the kernels' output layout."""
    return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])


# --------------------------------------------------------------------------- kernels

CONV_GEOMETRIES = [(3, 1, 1), (1, 1, 0), (3, 2, 1), (1, 2, 0), (3, 1, 0), (3, 2, 0)]  # (kernel, stride, padding)
CONV_SHAPES = [(2, 5, 7, 6), (1, 3, 13, 1), (2, 17, 1, 1)]


@pytest.mark.parametrize("shape", CONV_SHAPES, ids=["7x6", "13x1", "1x1_17ch"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "sliced"])
def test_implicit_gemm_conv_and_its_gradients_match_torch(device, shape, layout):
    dtype = exact_dtype(device)
    n, c, h, w = shape
    base = torch.randn(n, 2 * c, h, w + 1, dtype=dtype, device=device)
    x = base[:, ::2, :, 1:] if layout == "sliced" else base[:, :c, :, :w].contiguous()
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    for k, stride, pad in CONV_GEOMETRIES:
        if h + 2 * pad < k or w + 2 * pad < k:
            continue
        weight = torch.randn(6, c, k, k, dtype=dtype, device=device, requires_grad=True)
        xr = x.detach().clone().requires_grad_()
        ref = F.conv2d(xr, weight, stride=stride, padding=pad)
        out, sums = conv2d_implicit_gemm(x, pack_weight(weight.detach()), k, stride, pad, stats=True)
        close = dict(zip(("rtol", "atol"), tolerance(device)))
        torch.testing.assert_close(out, rows(ref.detach()), **close, msg=lambda m: f"k{k} s{stride} p{pad}: {m}")
        torch.testing.assert_close(sums[0], rows(ref.detach()).sum(0).double(), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(sums[1], rows(ref.detach()).pow(2).sum(0).double(), rtol=1e-4, atol=1e-4)
        dy = torch.randn_like(ref)
        ref.backward(dy)
        dw = conv2d_weight_grad(x, rows(dy).contiguous(), k, stride, pad)
        torch.testing.assert_close(unpack_weight(dw, k), weight.grad, **close, msg=lambda m: f"dW k{k} s{stride} p{pad}: {m}")
        if stride == 1 and pad == k // 2:  # the block's input gradient: a conv with the flipped, transposed weight
            dy_cl = dy.contiguous(memory_format=torch.channels_last)
            dx, _ = conv2d_implicit_gemm(dy_cl, pack_input_grad_weight(weight.detach()), k, 1, pad)
            torch.testing.assert_close(dx, rows(xr.grad), **close)


@pytest.mark.parametrize("channels", [5, 19])
def test_bn_finalize_matches_the_statistics_of_the_conv_output(device, channels):
    """One launch from the epilogue's per-tile partials to mean, invstd, unbiased var, scale and shift."""
    dtype = exact_dtype(device)
    x = torch.randn(3, 4, 7, 6, dtype=dtype, device=device) + 2.0
    weight = torch.randn(channels, 4, 3, 3, dtype=dtype, device=device)
    out, part = conv2d_implicit_gemm(x, pack_weight(weight), 3, 1, 1, stats=True, reduce_stats=False)
    gamma = 0.5 + torch.rand(channels, dtype=dtype, device=device)
    beta = torch.randn(channels, dtype=dtype, device=device)
    mean, invstd, var, scale, shift = bn_finalize(part, out.shape[0], 1e-5, gamma, beta)
    ref = out.double()
    rtol, atol = (1e-10, 1e-10) if dtype == torch.float64 else (1e-5, 1e-5)
    close = dict(rtol=rtol, atol=atol)
    expect_inv = torch.rsqrt(ref.var(0, unbiased=False) + 1e-5)
    torch.testing.assert_close(mean.double(), ref.mean(0), **close)
    torch.testing.assert_close(invstd.double(), expect_inv, **close)
    torch.testing.assert_close(var.double(), ref.var(0, unbiased=True), **close)
    torch.testing.assert_close(scale.double(), gamma.double() * expect_inv, **close)
    torch.testing.assert_close(shift.double(), beta.double() - ref.mean(0) * gamma.double() * expect_inv, **close)


def _bn_act_reference(x, scale, shift, lo, hi, slope, act_scale):
    v = x * scale[None, :, None, None] + shift[None, :, None, None]
    act = act_scale * F.leaky_relu(v, slope)
    channel = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    return torch.where((channel >= lo) & (channel < hi), act, v)


def test_prologue_applies_bn_and_activation_before_zero_padding(device):
    dtype = exact_dtype(device)
    x = torch.randn(2, 7, 5, 6, dtype=dtype, device=device, requires_grad=True)
    scale = torch.rand(7, dtype=dtype, device=device) + 0.5
    shift = torch.randn(7, dtype=dtype, device=device)
    weight = torch.randn(4, 7, 3, 3, dtype=dtype, device=device)
    prologue = Prologue(scale, shift, 2, 6, 0.1, 1.7)  # activation on channels 2..5 only
    h = _bn_act_reference(x, scale, shift, 2, 6, 0.1, 1.7)
    ref = F.conv2d(h, weight, padding=1)
    out, _ = conv2d_implicit_gemm(x.detach(), pack_weight(weight), 3, 1, 1, prologue=prologue)
    close = dict(zip(("rtol", "atol"), tolerance(device)))
    torch.testing.assert_close(out, rows(ref.detach()), **close)
    dy = torch.randn_like(ref)
    (dw_ref,) = torch.autograd.grad(F.conv2d(h.detach(), weight.requires_grad_(), padding=1), weight, dy)
    dw = conv2d_weight_grad(x.detach(), rows(dy).contiguous(), 3, 1, 1, prologue=prologue)
    torch.testing.assert_close(unpack_weight(dw, 3), dw_ref, **close)


def test_centre_only_ranges_skip_exactly_the_zero_taps(device):
    """A 1x1 kernel padded to 3x3 inside one GEMM: skipping its 8 zero taps changes nothing."""
    dtype = exact_dtype(device)
    x = torch.randn(2, 9, 6, 5, dtype=dtype, device=device)
    w = torch.randn(10, 9, 3, 3, dtype=dtype, device=device)
    w[:4, :, :, :] = 0  # output channels 0..3: a 1x1 kernel
    w[:4, :, 1, 1] = torch.randn(4, 9, dtype=dtype, device=device)
    w[:, 6:, :, :] *= torch.tensor([[0, 0, 0], [0, 1, 0], [0, 0, 0]], dtype=dtype, device=device)  # input channels 6..8: 1x1
    ref = rows(F.conv2d(x, w, padding=1))
    close = dict(zip(("rtol", "atol"), tolerance(device)))
    out, _ = conv2d_implicit_gemm(x, pack_weight(w), 3, 1, 1, centre_range=(0, 4))
    torch.testing.assert_close(out, ref, **close)
    out, _ = conv2d_implicit_gemm(x, pack_weight(w), 3, 1, 1, skip_range=(6, 9))
    torch.testing.assert_close(out, ref, **close)


@pytest.mark.parametrize("training", [True, False])
def test_row_passes_match_autograd_of_bn_and_activation(device, training):
    dtype = exact_dtype(device)
    m, c, lo, hi, slope, act_scale = 37, 19, 3, 17, 0.2, 1.3
    z = torch.randn(m, c, dtype=dtype, device=device, requires_grad=True)
    gamma = torch.rand(c, dtype=dtype, device=device) + 0.5
    beta = torch.randn(c, dtype=dtype, device=device)
    if training:
        mean, var = z.mean(0), z.var(0, unbiased=False)
    else:
        mean, var = z.detach().mean(0) + 0.1, z.detach().var(0) + 0.2
    invstd = torch.rsqrt(var + 1e-5)
    xhat = (z - mean) * invstd
    channel = torch.arange(c, device=device)
    v = xhat * gamma + beta
    y = torch.where((channel >= lo) & (channel < hi), act_scale * F.leaky_relu(v, slope), v)
    dy = torch.randn_like(y)
    (dz_ref,) = torch.autograd.grad(y, z, dy)

    scale = gamma * invstd.detach()
    out = bn_act_forward(z.detach(), scale, beta - mean.detach() * scale, (lo, hi), slope, act_scale)
    close = dict(zip(("rtol", "atol"), tolerance(device)))
    torch.testing.assert_close(out, y.detach(), **close)
    stats = (mean.detach(), invstd.detach(), gamma, beta)
    sums = bn_act_backward_sums(dy, z.detach(), *stats, (lo, hi), slope, act_scale)
    # slopes as tensors of the data's dtype: Python scalars in torch.where would round them to float32
    slopes = act_scale * torch.where(v > 0, torch.ones_like(v), torch.full_like(v, slope))
    g = dy * torch.where((channel >= lo) & (channel < hi), slopes, torch.ones_like(v))
    torch.testing.assert_close(sums[0], g.sum(0).detach().double(), **close)  # = d(beta)
    torch.testing.assert_close(sums[1], (g * xhat).sum(0).detach().double(), **close)  # = d(gamma)
    dz = bn_act_backward_apply(dy, z.detach(), *stats, sums, training, (lo, hi), slope, act_scale)
    torch.testing.assert_close(dz, dz_ref, **close)


# --------------------------------------------------------------------------- the block

QUICK = [  # (case, dtype, training): every case in float64 training, the rest sampled (the interpreter is slow)
    *[(case, torch.float64, True) for case in sorted(BLOCK_CASES)],
    ("default", torch.float64, False),
    ("untied_coder_3x3", torch.float64, False),
    ("default", torch.float32, True),
    ("leaky_scaled", torch.float32, False),
    ("narrow_coder_wide_learner", torch.float32, True),
]
ALL_GPU = [(case, torch.float32, training) for case in sorted(BLOCK_CASES) for training in (True, False)]


@pytest.mark.parametrize("case, dtype, training", ALL_GPU if ON_GPU else QUICK, ids=lambda v: str(v).replace("torch.", ""))
def test_triton_block_matches_reference(device, case, dtype, training):
    ref = pk.PNNHConv2d(5, backend="reference", **BLOCK_CASES[case]).to(device=device, dtype=dtype).train(training)
    randomize_norms(ref)
    x = torch.randn(3, 5, 7, 6, dtype=dtype, device=device)
    assert_modules_agree(ref, twin(ref, "triton"), x, *TOLERANCES[dtype])


@pytest.mark.parametrize("shape", [(1, 6, 7, 7), (2, 6, 1, 1), (1, 6, 13, 1), (2, 6, 2, 13)], ids=["batch1", "1x1", "column", "row"])
def test_triton_block_odd_shapes(device, shape):
    dtype = exact_dtype(device)
    ref = pk.PNNHConv2d(6, backend="reference").to(device=device, dtype=dtype)
    x = torch.randn(shape, dtype=dtype, device=device)
    assert_modules_agree(ref, twin(ref, "triton"), x, *TOLERANCES[dtype], steps=1)


def test_triton_block_channels_last_and_strided_input(device):
    dtype = exact_dtype(device)
    ref = pk.PNNHConv2d(6, backend="reference").to(device=device, dtype=dtype)
    randomize_norms(ref)
    fused = twin(ref, "triton")
    strided = torch.randn(2, 12, 9, 10, dtype=dtype, device=device)[:, ::2, :, 1:]
    channels_last = torch.randn(2, 6, 9, 9, dtype=dtype, device=device).to(memory_format=torch.channels_last)
    for x in (strided, channels_last):
        assert_modules_agree(ref, fused, x, *TOLERANCES[dtype], steps=1)
    assert fused(channels_last).is_contiguous(memory_format=torch.channels_last)
    assert fused(strided).is_contiguous()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_low_precision_error_within_twice_eager(device, dtype):
    """FlashAttention's rule, over outputs and every gradient: the fused kernels in fp16/bf16 err at most
    about twice as much as the eager PyTorch block in the same dtype (both against float64)."""
    ref64 = pk.PNNHConv2d(16, backend="reference").to(device=device, dtype=torch.float64)
    randomize_norms(ref64)
    x64 = torch.randn(2, 16, 8, 8, dtype=torch.float64, device=device)
    errors = low_precision_errors(ref64, "triton", x64, dtype)
    assert errors["triton"] <= 2 * errors["eager"] + 1e-3, errors


@pytest.mark.parametrize("training", [True, False])
def test_triton_block_gradcheck(device, training):
    if device != "cpu":
        pytest.skip("gradcheck needs float64, which Triton's GPU dot lacks (checked in the interpreter)")
    block = pk.PNNHConv2d(3, hidden_channels=4, backend="triton", coder_kernel_size=3, tied=False)
    block = block.to(device=device, dtype=torch.float64).train(training)
    randomize_norms(block)
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64, device=device, requires_grad=True)
    assert block_gradcheck(block, x, fast_mode=True)


def test_triton_custom_op_passes_opcheck(device):
    from pnnh_kernels.backends.triton_conv_op import conv_block_triton

    block = pk.PNNHConv2d(4).to(device=device, dtype=exact_dtype(device))
    x = torch.randn(2, 4, 5, 5, dtype=exact_dtype(device), device=device, requires_grad=True)
    torch.library.opcheck(conv_block_triton, conv_op_args(block, x))


def test_torch_compile_traces_the_triton_backend_without_graph_breaks(device):
    dtype = exact_dtype(device)
    block = pk.PNNHConv2d(4, backend="triton").to(device=device, dtype=dtype)
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 4, 5, 5, dtype=dtype, device=device)
    assert_modules_agree(twin(block, "reference"), compiled, x, *TOLERANCES[dtype], steps=1)


def test_triton_refuses_cpu_tensors_without_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    block = pk.PNNHConv2d(4)
    with pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET"):
        select_backend("triton", "conv2d", torch.randn(1, 4, 3, 3), block.block_weights(), block.config)


def test_auto_never_picks_the_interpreter():
    block = pk.PNNHConv2d(4)
    with torch.no_grad():
        assert select_backend("auto", "conv2d", torch.randn(1, 4, 3, 3), block.block_weights(), block.config).name != "triton"


def test_triton_refuses_what_it_does_not_fuse():
    for lin, match in ((pk.PNNHLinear(4, norm="batch"), "fuses layer norm"), (pk.PNNHLinear(4, bias=True), "no linear biases")):
        with pytest.raises(BackendUnavailableError, match=match):
            select_backend("triton", "linear", torch.randn(2, 4), lin.block_weights(), lin.config)
    gelu = pk.PNNHConv2d(4, activation="gelu")
    with pytest.raises(BackendUnavailableError, match="leaky_relu/identity family"):
        select_backend("triton", "conv2d", torch.randn(1, 4, 3, 3), gelu.block_weights(), gelu.config)
