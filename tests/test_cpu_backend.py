"""The C++ 'cpu' backend against the reference: outputs, every gradient, running statistics, gradcheck,
odd shapes and layouts, the custom ops' registration (opcheck, torch.compile), auto-selection, refusals."""

import pytest
import torch
from helpers import (
    BLOCK_CASES,
    LINEAR_CASES,
    TOLERANCES,
    assert_modules_agree,
    block_gradcheck,
    op_args,
    randomize_norms,
    twin,
)
from planar_cpu_kernels import planar_cpu_kernels, run_cuda_op_on_cpu_kernels

import pnnh_kernels as pk
from pnnh_kernels._extension import extension, extension_error
from pnnh_kernels.backends.cpu import CpuBackend
from pnnh_kernels.backends.cpu.conv import conv_block_rows
from pnnh_kernels.backends.cuda.conv import conv_block_fused
from pnnh_kernels.backends.registry import select_backend

pytestmark = pytest.mark.skipif(extension_error() is not None, reason=f"C++ extension unavailable: {extension_error()}")

CASES = BLOCK_CASES


@pytest.fixture(params=["rows", "planar"])
def cpu_op(request, monkeypatch):
    """The 'cpu' backend runs the channels-last rows op; the planar (NCHW) op is the one the 'cuda'
    backend runs, so its Python half is checked here too, on the test-only planar CPU passes."""
    if request.param == "planar":
        run_cuda_op_on_cpu_kernels(monkeypatch)
        monkeypatch.setattr(CpuBackend, "conv_op", lambda self: conv_block_fused)
    return request.param


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cpu_backend_matches_reference(case, training, dtype, cpu_op):
    ref = pk.PNNHConv2d(5, backend="reference", **CASES[case]).to(dtype).train(training)
    randomize_norms(ref)
    fused = twin(ref, "cpu")
    assert_modules_agree(ref, fused, torch.randn(3, 5, 7, 6, dtype=dtype), *TOLERANCES[dtype])


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
        assert_modules_agree(ref, fused, x, *TOLERANCES[torch.float64])
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
    assert_modules_agree(ref, fused, x, *TOLERANCES[torch.float64])


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
    op = (conv_block_rows if cpu_op == "rows" else conv_block_fused).op
    block = pk.PNNHConv2d(4, **options).double()
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64).contiguous(memory_format=layout).requires_grad_()
    torch.library.opcheck(op, op_args(block, x))


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
    assert_modules_agree(
        reference, compiled, torch.randn(shape, dtype=torch.float64), *TOLERANCES[torch.float64], steps=1
    )


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
    torch.library.opcheck(torch.ops.pnnh.linear_block_cpu.default, op_args(block, x))


def test_extension_runs_its_passes_on_torchs_thread_pool():
    # built without OpenMP, ATen's header-only parallel_for silently runs every pass on one thread
    assert extension().with_openmp


def test_planar_kernels_reject_bad_arguments():
    C = planar_cpu_kernels()
    z = torch.randn(2, 4, 5)
    with pytest.raises(RuntimeError, match="channel range out of bounds"):
        C.channel_sums(z, 2, 4)
    with pytest.raises(RuntimeError, match="contiguous"):
        C.channel_sums(z.transpose(0, 2), 0, 1)
    with pytest.raises(RuntimeError, match="data's dtype"):
        C.bn_act_apply(
            z,
            0,
            torch.empty(2, 4, 5),
            torch.zeros(4, dtype=torch.float64),
            torch.ones(4),
            torch.ones(4),
            torch.zeros(4),
            True,
            0.0,
            1.0,
        )


def _norm_params(cn, dtype=torch.float64):
    g = torch.Generator().manual_seed(cn)
    mean, invstd = torch.randn(cn, generator=g, dtype=dtype), 0.5 + torch.rand(cn, generator=g, dtype=dtype)
    gamma, beta = 0.5 + torch.rand(cn, generator=g, dtype=dtype), torch.randn(cn, generator=g, dtype=dtype)
    return mean, invstd, gamma, beta


# (rows, width, c0, cn): whole rows walked in groups (with leftover rows), a column range, one channel
ROW_CASES = [(131, 16, 0, 16), (300, 48, 0, 48), (257, 24, 5, 11), (7, 3, 2, 1), (1, 8, 0, 8)]


@pytest.mark.parametrize("rows, width, c0, cn", ROW_CASES)
def test_rows_kernels_match_torch(rows, width, c0, cn):
    C = extension()
    z = torch.randn(rows, width, dtype=torch.float64)
    dy = torch.randn(rows, cn, dtype=torch.float64)
    mean, invstd, gamma, beta = _norm_params(cn)
    col = z[:, c0 : c0 + cn]
    sums = C.rows_channel_sums(z, c0, cn)
    torch.testing.assert_close(sums, torch.stack([col.sum(0), col.pow(2).sum(0)]))

    slope, scale = 0.2, 1.3
    act = lambda t: scale * torch.where(t > 0, t, slope * t)
    out = torch.full((rows, cn + 2), 7.0, dtype=torch.float64)
    C.rows_bn_act_apply(z, c0, out, 1, mean, invstd, gamma, beta, True, slope, scale)
    xhat = (col - mean) * invstd
    torch.testing.assert_close(out[:, 1 : 1 + cn], act(xhat * gamma + beta))
    assert (out[:, 0] == 7).all() and (out[:, -1] == 7).all()  # nothing written outside the range

    for training in (True, False):
        zz = col.detach().clone().requires_grad_()
        if training:  # batch statistics: the gradient flows through mean and invstd too
            m, v = zz.mean(0), zz.var(0, unbiased=False)
            y = act((zz - m) * torch.rsqrt(v + 1e-5) * gamma + beta)
            b_mean, b_inv = m.detach(), torch.rsqrt(v.detach() + 1e-5)
        else:
            y = act((zz - mean) * invstd * gamma + beta)
            b_mean, b_inv = mean, invstd
        (expected,) = torch.autograd.grad(y, zz, dy)
        sums_g = C.rows_bn_act_backward_sums(dy, z, c0, b_mean, b_inv, gamma, beta, True, slope, scale)
        dz = torch.zeros_like(z)
        C.rows_bn_act_backward_apply(dy, z, c0, dz, b_mean, b_inv, gamma, beta, sums_g, training, True, slope, scale)
        torch.testing.assert_close(dz[:, c0 : c0 + cn], expected)
        assert dz[:, :c0].abs().sum() == 0 and dz[:, c0 + cn :].abs().sum() == 0


def test_rows_kernels_reject_bad_arguments():
    C = extension()
    z = torch.randn(6, 4)
    params = _norm_params(3, torch.float32)
    with pytest.raises(RuntimeError, match="out of bounds"):
        C.rows_channel_sums(z, 2, 3)
    with pytest.raises(RuntimeError, match="contiguous"):
        C.rows_channel_sums(z.t(), 0, 1)
    with pytest.raises(RuntimeError, match="contiguous"):
        C.rows_channel_sums(torch.randn(2, 3, 4), 0, 1)
    with pytest.raises(RuntimeError, match="data's dtype"):
        C.rows_bn_act_apply(z, 0, torch.empty(6, 3), 0, *_norm_params(3), True, 0.0, 1.0)
    with pytest.raises(RuntimeError, match="row counts differ"):
        C.rows_bn_act_apply(z, 0, torch.empty(5, 3), 0, *params, True, 0.0, 1.0)
    with pytest.raises(RuntimeError, match="must have the range's"):
        C.rows_bn_act_backward_sums(torch.randn(6, 4), z, 0, *params, True, 0.0, 1.0)
    with pytest.raises(RuntimeError, match="float64"):
        C.rows_bn_act_backward_apply(
            torch.randn(6, 3), z, 0, torch.empty_like(z), *params, torch.zeros(2, 3), True, True, 0.0, 1.0
        )


def test_planar_channel_sums_match_torch():
    z = torch.randn(3, 7, 11, dtype=torch.float64)
    sums = planar_cpu_kernels().channel_sums(z, 2, 4)
    torch.testing.assert_close(sums[0], z[:, 2:6].sum((0, 2)))
    torch.testing.assert_close(sums[1], z[:, 2:6].pow(2).sum((0, 2)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rows_batch_stats_match_torch(dtype):
    z = (1.5 + torch.randn(301, 9, dtype=torch.float64)).to(dtype)
    mean, invstd, var = extension().rows_batch_stats(z, 2, 5, 1e-5)
    cols = z[:, 2:7].double()
    assert mean.dtype == invstd.dtype == var.dtype == dtype
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(mean.double(), cols.mean(0), **tol)
    torch.testing.assert_close(var.double(), cols.var(0, unbiased=True), **tol)
    torch.testing.assert_close(invstd.double(), torch.rsqrt(cols.var(0, unbiased=False) + 1e-5), **tol)


def _ln_act_autograd(z, c0, cn, gamma, beta, kind, slope, scale, use_act):
    """act(LN(z[:, c0:c0+cn])) in float64 autograd: the pass's reference."""
    y = torch.nn.functional.layer_norm(z[:, c0 : c0 + cn], (cn,), gamma, beta, 1e-5)
    if not use_act:
        return y
    return scale * (torch.nn.functional.gelu(y) if kind == 1 else torch.nn.functional.leaky_relu(y, slope))


@pytest.mark.parametrize("width", [1536, 37], ids=["vector-body", "odd"])
@pytest.mark.parametrize(
    "act", [(1, 0.0, 1.3, True), (0, 0.2, 1.4, True), (0, 0.0, 1.0, False)], ids=["gelu", "leaky", "none"]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ln_act_passes_match_autograd(width, act, dtype):
    """The fused layer-norm + activation passes, forward and backward, against float64 autograd. Wide gammas
    push the normalised values out to |y| ~ 30, past the fast erf's clamp (3.92) and exp's underflow."""
    kind, slope, scale, use_act = act
    C = extension()
    rows, c0 = 70, 3  # more rows than one chunk of the affine partials (64)
    z64 = torch.randn(rows, c0 + width + 2, dtype=torch.float64) * 3 + 1
    gamma64 = torch.randn(width, dtype=torch.float64) * 8
    beta64 = torch.randn(width, dtype=torch.float64)
    dy64 = torch.randn(rows, width, dtype=torch.float64)
    z, gamma, beta, dy = (t.to(dtype) for t in (z64, gamma64, beta64, dy64))

    out = torch.zeros(rows, width + 5, dtype=dtype)
    stats = C.ln_act_forward(z, c0, width, out, 4, gamma, beta, 1e-5, use_act, kind, slope, scale)
    leaves = [t.clone().requires_grad_() for t in (z64, gamma64, beta64)]
    expected = _ln_act_autograd(*leaves[:1], c0, width, *leaves[1:], kind, slope, scale, use_act)
    tol = dict(rtol=2e-5, atol=2e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out[:, 4 : 4 + width].double(), expected.detach(), **tol)
    assert out[:, :4].abs().sum() == 0 and out[:, 4 + width :].abs().sum() == 0  # nothing written outside the range

    expected.backward(dy64)
    dz = torch.zeros_like(z)
    partial = C.ln_act_backward(dy, 0, z, c0, width, stats, gamma, beta, dz, use_act, kind, slope, scale)
    scale_of = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else tol
    torch.testing.assert_close(dz.double(), leaves[0].grad, **scale_of)
    dgamma, dbeta = partial.sum(0)
    torch.testing.assert_close(dgamma, leaves[1].grad, **scale_of)
    torch.testing.assert_close(dbeta, leaves[2].grad, **scale_of)


@pytest.mark.parametrize("kind", [0, 1], ids=["leaky", "gelu"])
def test_ln_act_backward_in_place_over_its_input_gradient(kind):
    """PNNHLinear's backward writes dz over dh: the same results as into a separate tensor."""
    C = extension()
    rows, cols, c0, cn = 70, 200, 40, 150
    z, dy = torch.randn(rows, cols) * 2, torch.randn(rows, cols)
    gamma, beta = torch.randn(cn) * 3, torch.randn(cn)
    stats = C.ln_act_forward(z, c0, cn, torch.empty_like(z), c0, gamma, beta, 1e-5, True, kind, 0.1, 1.2)
    apart = torch.zeros_like(z)
    p_apart = C.ln_act_backward(dy, c0, z, c0, cn, stats, gamma, beta, apart, True, kind, 0.1, 1.2)
    inplace = dy.clone()
    p_inplace = C.ln_act_backward(inplace, c0, z, c0, cn, stats, gamma, beta, inplace, True, kind, 0.1, 1.2)
    torch.testing.assert_close(inplace[:, c0 : c0 + cn], apart[:, c0 : c0 + cn], rtol=0, atol=0)
    torch.testing.assert_close(p_inplace, p_apart, rtol=0, atol=0)
    torch.testing.assert_close(inplace[:, :c0], dy[:, :c0], rtol=0, atol=0)  # outside the range: untouched


def test_the_installed_extension_has_no_planar_cpu_passes():
    # they are test scaffolding (tests/planar_cpu/); built without CUDA, the extension has no planar passes
    if not extension().with_cuda:
        assert not hasattr(extension(), "channel_sums")
