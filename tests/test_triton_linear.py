"""The Triton PNNHLinear: its kernels (products with the layer-norm prologue and row-statistics epilogue,
the fused dAct + dLayerNorm pass) against PyTorch, and the block against the literal reference.

In the interpreter (``TRITON_INTERPRET=1``, CI) on tiny shapes; compiled on a CUDA machine without it.
"""
import importlib.util

import pytest
import torch
import torch.nn.functional as F

import pnnh_kernels as pk
from helpers import LINEAR_CASES, TOLERANCES, assert_modules_agree, block_gradcheck, low_precision_errors, randomize_norms, twin

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)

from pnnh_kernels.triton_kernels.linear_gemm import LnPrologue, ln_gemm, row_statistics  # noqa: E402
from pnnh_kernels.triton_kernels.ln_act_rows import ln_act_backward, ln_act_forward  # noqa: E402
from triton_devices import device, exact_dtype, requires_a_device  # noqa: E402,F401  (device: a fixture)

pytestmark = requires_a_device


def tol(dtype):
    rtol, atol = TOLERANCES[dtype]
    return dict(rtol=rtol, atol=atol)


def _act(y, gelu, slope, scale):
    return scale * (F.gelu(y) if gelu else F.leaky_relu(y, slope))


def _segment_ln(z, split, eps=1e-5):
    """Layer norm of each row's columns [0, split) and [split, end) separately (no affine)."""
    return torch.cat([F.layer_norm(z[:, :split], (split,), eps=eps), F.layer_norm(z[:, split:], (z.shape[1] - split,), eps=eps)], 1)


def _prologue(z, split, gelu, slope, scale):
    g = torch.Generator().manual_seed(3)
    gamma = (0.5 + torch.rand(z.shape[1], generator=g, dtype=torch.float64)).to(z)
    beta = torch.randn(z.shape[1], generator=g, dtype=torch.float64).to(z)
    stats = row_statistics(ln_gemm(z, torch.eye(z.shape[1], dtype=z.dtype, device=z.device), stats_split=split)[1], 1e-5)
    pro = LnPrologue(stats, gamma, beta, split, gelu, slope, scale)
    h = _segment_ln(z, split) * gamma + beta
    h = torch.cat([h[:, :split], _act(h[:, split:], gelu, slope, scale)], 1)
    return pro, h


@pytest.mark.parametrize("m, k, n, split", [(37, 20, 19, 7), (5, 3, 33, 33), (1, 8, 9, 4)])
def test_ln_gemm_product_and_row_statistics(device, m, k, n, split):
    dtype = exact_dtype(device)
    a = torch.randn(m, k, dtype=dtype, device=device) * 3 + 5  # a large mean: the statistics must not cancel
    b = torch.randn(n, k, dtype=dtype, device=device).t()  # a transposed view: read through its strides
    out, part = ln_gemm(a, b, stats_split=split)
    expected = a @ b
    torch.testing.assert_close(out, expected, **tol(dtype))
    stats = row_statistics(part, 1e-5)
    for seg, cols in enumerate((expected[:, :split], expected[:, split:])):
        cols = cols if cols.shape[1] else expected[:, :split]  # an empty segment repeats segment 0
        torch.testing.assert_close(stats[2 * seg], cols.mean(1), **tol(dtype))
        torch.testing.assert_close(stats[2 * seg + 1], torch.rsqrt(cols.var(1, unbiased=False) + 1e-5), **tol(dtype))


@pytest.mark.parametrize("gelu, slope, scale", [(True, 0.0, 1.0), (False, 0.2, 1.3)], ids=["gelu", "leaky"])
def test_ln_gemm_prologues(device, gelu, slope, scale):
    dtype = exact_dtype(device)
    tokens, width, out_ch, split = 23, 18, 11, 5
    z = torch.randn(tokens, width, dtype=dtype, device=device)
    pro, h = _prologue(z, split, gelu, slope, scale)
    w = torch.randn(out_ch, width, dtype=dtype, device=device)
    y, _ = ln_gemm(z, w.t(), prologue_a=pro)  # the forward product: normalise A's rows (tokens)
    torch.testing.assert_close(y, h @ w.t(), **tol(dtype))
    du = torch.randn(tokens, out_ch, dtype=dtype, device=device)
    dw, _ = ln_gemm(du.t(), z, prologue_b=pro)  # the weight gradient: normalise B's rows (tokens)
    torch.testing.assert_close(dw, du.t() @ h, **tol(dtype))


@pytest.mark.parametrize("act, gelu", [(True, True), (True, False), (False, False)], ids=["gelu", "leaky", "none"])
def test_ln_act_forward_and_backward_match_autograd(device, act, gelu):
    dtype = exact_dtype(device)
    tokens, width, lo, cn = 21, 13, 4, 7
    slope, scale = (0.0, 1.2) if gelu else (0.3, 1.1)
    z = torch.randn(tokens, width, dtype=dtype, device=device)
    gamma = 0.5 + torch.rand(cn, dtype=dtype, device=device)
    beta = torch.randn(cn, dtype=dtype, device=device)
    zz = z[:, lo : lo + cn].clone().requires_grad_()
    gg, bb = gamma.clone().requires_grad_(), beta.clone().requires_grad_()
    y = F.layer_norm(zz, (cn,), gg, bb, eps=1e-5)
    y = _act(y, gelu, slope, scale) if act else y

    mean, var = zz.detach().mean(1), zz.detach().var(1, unbiased=False)
    stats = torch.stack([mean, torch.rsqrt(var + 1e-5)] * 2)
    torch.testing.assert_close(ln_act_forward(zz.detach().contiguous(), stats, gamma, beta, act, gelu, slope, scale), y.detach(), **tol(dtype))

    dy = torch.randn(tokens, width, dtype=dtype, device=device)
    expected = torch.autograd.grad(y, (zz, gg, bb), dy[:, lo : lo + cn])
    dz = torch.zeros_like(z)
    dgamma, dbeta = ln_act_backward(dy, z, dz, lo, cn, stats[0], stats[1], gamma, beta, act, gelu, slope, scale)
    torch.testing.assert_close(dz[:, lo : lo + cn], expected[0], **tol(dtype))
    torch.testing.assert_close(dgamma.to(dtype), expected[1], **tol(dtype))
    torch.testing.assert_close(dbeta.to(dtype), expected[2], **tol(dtype))
    assert dz[:, :lo].abs().sum() == 0 and dz[:, lo + cn :].abs().sum() == 0


@pytest.mark.parametrize("case", sorted(LINEAR_CASES))
def test_triton_linear_matches_reference(device, case):
    dtype = exact_dtype(device)
    ref = pk.PNNHLinear(6, hidden_features=10, backend="reference", **LINEAR_CASES[case]).to(device=device, dtype=dtype)
    randomize_norms(ref)
    for shape in [(3, 4, 6), (1, 6), (6,)]:
        assert_modules_agree(ref, twin(ref, "triton"), torch.randn(shape, dtype=dtype, device=device), *TOLERANCES[dtype], steps=1)


def test_triton_linear_gradcheck_and_opcheck(device):
    if device != "cpu":
        pytest.skip("gradcheck needs float64, which Triton's GPU dot lacks (checked in the interpreter)")
    block = pk.PNNHLinear(4, hidden_features=5, activation="gelu", backend="triton", tied=False).double()
    randomize_norms(block)
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    assert block_gradcheck(block, x, fast_mode=True)
    w, n = block.block_weights(), block.block_norms()
    args = (x, w.encoder, w.learner1, w.learner2, w.decoder, n.coder.weight, n.coder.bias, n.learner.weight,
            n.learner.bias, n.out.weight, n.out.bias, 1e-5, True, 0.0, 1.0, 1.0, True)
    torch.library.opcheck(torch.ops.pnnh.linear_block_triton.default, args)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_linear_low_precision_error_within_twice_eager(device, dtype):
    ref64 = pk.PNNHLinear(32, hidden_features=64, activation="gelu", backend="reference").to(device=device, dtype=torch.float64)
    randomize_norms(ref64)
    errors = low_precision_errors(ref64, "triton", torch.randn(16, 32, dtype=torch.float64, device=device), dtype)
    assert errors["triton"] <= 2 * errors["eager"] + 1e-3, errors


def test_torch_compile_traces_the_triton_linear_without_graph_breaks(device):
    dtype = exact_dtype(device)
    block = pk.PNNHLinear(4, hidden_features=6, backend="triton").to(device=device, dtype=dtype)
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    assert_modules_agree(twin(block, "reference"), compiled, torch.randn(3, 4, dtype=dtype, device=device), *TOLERANCES[dtype], steps=1)
