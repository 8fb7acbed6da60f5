"""The Triton PNNHLinear: its kernels (products with the layer-norm prologue, its backward on an output
gradient and the row-statistics epilogue; the LN + activation pass and the dAct + dLayerNorm sums)
against PyTorch, and the block against the literal reference.

In the interpreter (``TRITON_INTERPRET=1``, CI) on tiny shapes; compiled on a CUDA machine without it.
"""

import importlib.util

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    LINEAR_CASES,
    assert_matches_reference,
    block_gradcheck,
    low_precision_errors,
    op_args,
    randomize_norms,
    twin,
)

import pnnh_kernels as pk

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)

import triton
from triton_devices import exact_dtype, kernel_tolerance, requires_a_device

from pnnh_kernels.triton_kernels.linear_gemm import ln_gemm, row_statistics
from pnnh_kernels.triton_kernels.ln_act_rows import ln_act_forward, ln_grad_sums
from pnnh_kernels.triton_kernels.ln_tiles import LnPrologue

pytestmark = requires_a_device


def _act(y, gelu, slope, scale):
    return scale * (F.gelu(y) if gelu else F.leaky_relu(y, slope))


def _segment_ln(z, split, eps=1e-5):
    """Layer norm of each row's columns [0, split) and [split, end) separately (no affine)."""
    return torch.cat(
        [F.layer_norm(z[:, :split], (split,), eps=eps), F.layer_norm(z[:, split:], (z.shape[1] - split,), eps=eps)], 1
    )


def _prologue(z, split, gelu, slope, scale):
    g = torch.Generator().manual_seed(3)
    gamma = (0.5 + torch.rand(z.shape[1], generator=g, dtype=torch.float64)).to(z)
    beta = torch.randn(z.shape[1], generator=g, dtype=torch.float64).to(z)
    stats = row_statistics(
        ln_gemm(z, torch.eye(z.shape[1], dtype=z.dtype, device=z.device), stats_split=split)[1], 1e-5
    )
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
    torch.testing.assert_close(out, expected, **kernel_tolerance(dtype))
    stats = row_statistics(part, 1e-5)
    for seg, cols in enumerate((expected[:, :split], expected[:, split:])):
        cols = cols if cols.shape[1] else expected[:, :split]  # an empty segment repeats segment 0
        torch.testing.assert_close(stats[2 * seg], cols.mean(1), **kernel_tolerance(dtype))
        torch.testing.assert_close(
            stats[2 * seg + 1], torch.rsqrt(cols.var(1, unbiased=False) + 1e-5), **kernel_tolerance(dtype)
        )


def test_row_statistics_partials_past_the_launched_tiles_read_as_zero(device, monkeypatch):
    """The partials are sized for the narrowest BLOCK_N an autotuner may pick; a launch with wider tiles
    zeroes the tiles it does not own instead of a memset. Forced here: tiles for BLOCK_N 4, NaN-filled."""
    from pnnh_kernels.triton_kernels import linear_gemm

    monkeypatch.setattr(linear_gemm, "_min_block_n", lambda: 4)
    monkeypatch.setattr(
        linear_gemm,
        "_partials",
        lambda tiles, m, like, acc: torch.full((tiles, 2, 4, m), float("nan"), dtype=acc, device=like.device),
    )
    dtype = exact_dtype(device)
    a, b = torch.randn(9, 6, dtype=dtype, device=device), torch.randn(6, 21, dtype=dtype, device=device)
    out, part = linear_gemm.ln_gemm(a, b, stats_split=8)
    assert part.shape[0] == 6 and part.shape[0] > triton.cdiv(
        21, linear_gemm._ln_gemm_kernel.configs[0].kwargs["BLOCK_N"]
    )
    stats = row_statistics(part, 1e-5)
    torch.testing.assert_close(stats[0], out[:, :8].mean(1), **kernel_tolerance(dtype))
    torch.testing.assert_close(
        stats[3], torch.rsqrt(out[:, 8:].var(1, unbiased=False) + 1e-5), **kernel_tolerance(dtype)
    )


def test_ln_gemm_writes_into_a_strided_out(device):
    dtype = exact_dtype(device)
    a, b = torch.randn(7, 5, dtype=dtype, device=device), torch.randn(5, 3, dtype=dtype, device=device)
    buffer = torch.full(
        (3, 7), float("nan"), dtype=torch.float64 if dtype == torch.float64 else torch.float32, device=device
    )
    out, _ = ln_gemm(a, b, out=buffer.t())
    assert out.data_ptr() == buffer.data_ptr()
    torch.testing.assert_close(buffer.t(), (a @ b).to(buffer.dtype), **kernel_tolerance(dtype))
    with pytest.raises(ValueError, match="is not"):
        ln_gemm(a, b, out=buffer)


@pytest.mark.parametrize("gelu, slope, scale", [(True, 0.0, 1.0), (False, 0.2, 1.3)], ids=["gelu", "leaky"])
def test_ln_gemm_prologues(device, gelu, slope, scale):
    dtype = exact_dtype(device)
    tokens, width, out_ch, split = 23, 18, 11, 5
    z = torch.randn(tokens, width, dtype=dtype, device=device)
    pro, h = _prologue(z, split, gelu, slope, scale)
    w = torch.randn(out_ch, width, dtype=dtype, device=device)
    y, _ = ln_gemm(z, w.t(), prologue_a=pro)  # the forward product: normalise A's rows (tokens)
    torch.testing.assert_close(y, h @ w.t(), **kernel_tolerance(dtype))
    du = torch.randn(tokens, out_ch, dtype=dtype, device=device)
    dw, _ = ln_gemm(du.t(), z, prologue_b=pro)  # the weight gradient: normalise B's rows (tokens)
    torch.testing.assert_close(dw, du.t() @ h, **kernel_tolerance(dtype))


@pytest.mark.parametrize("act, gelu", [(True, True), (True, False), (False, False)], ids=["gelu", "leaky", "none"])
def test_ln_act_forward_matches_autograd(device, act, gelu):
    dtype = exact_dtype(device)
    tokens, width = 21, 13
    slope, scale = (0.0, 1.2) if gelu else (0.3, 1.1)
    z = torch.randn(tokens, width, dtype=dtype, device=device)
    gamma = 0.5 + torch.rand(width, dtype=dtype, device=device)
    beta = torch.randn(width, dtype=dtype, device=device)
    y = F.layer_norm(z, (width,), gamma, beta, eps=1e-5)
    y = _act(y, gelu, slope, scale) if act else y
    mean, var = z.mean(1), z.var(1, unbiased=False)
    stats = torch.stack([mean, torch.rsqrt(var + 1e-5)] * 2)
    torch.testing.assert_close(
        ln_act_forward(z, stats, gamma, beta, act, gelu, slope, scale), y, **kernel_tolerance(dtype)
    )


def _segmented_block_grads(u, dy, split, gamma, beta, gelu, slope, scale):
    """du, d gamma, d beta of y = [LN(u[:, :split]), act(LN(u[:, split:]))] * gamma + beta, by autograd."""
    uu, gg, bb = (t.detach().clone().requires_grad_() for t in (u, gamma, beta))
    h = (
        _segment_ln(uu, split) * gg + bb
        if 0 < split < u.shape[1]
        else F.layer_norm(uu, (u.shape[1],), eps=1e-5) * gg + bb
    )
    y = torch.cat([h[:, :split], _act(h[:, split:], gelu, slope, scale)], 1)
    return torch.autograd.grad(y, (uu, gg, bb), dy)


@pytest.mark.parametrize(
    "split, gelu", [(5, True), (5, False), (0, False), (17, True)], ids=["two_gelu", "two_leaky", "all_act", "no_act"]
)
def test_ln_grad_prologue_matches_autograd(device, split, gelu):
    """The sums pass and the gradient prologue against autograd of the segmented LN + activation: du
    itself (through an identity product), du @ W (an input gradient), du^T @ X and du^T @ LN(z) (weight
    gradients: tokens along the reduced axis, the second with both prologues), and the norm's
    parameter gradients, with gamma / beta given as the two segments' halves."""
    dtype = exact_dtype(device)
    tokens, width, n_out = 19, 17, 11
    slope, scale = (0.0, 1.2) if gelu else (0.2, 1.3)
    g = torch.Generator().manual_seed(11)

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)

    u = rand(tokens, width) * 2 + 1
    gamma, beta = 0.5 + rand(width).abs(), rand(width)
    stats = row_statistics(ln_gemm(u, torch.eye(width, dtype=dtype, device=device), stats_split=split)[1], 1e-5)
    norm = LnPrologue(stats, (gamma[:split], gamma[split:]), (beta[:split], beta[split:]), split, gelu, slope, scale)
    dy = rand(tokens, width)
    du_ref, dgamma_ref, dbeta_ref = _segmented_block_grads(u, dy, split, gamma, beta, gelu, slope, scale)

    grad, dgamma, dbeta = ln_grad_sums(dy, u, norm)
    torch.testing.assert_close(dgamma.to(dtype), dgamma_ref, **kernel_tolerance(dtype))
    torch.testing.assert_close(dbeta.to(dtype), dbeta_ref, **kernel_tolerance(dtype))
    eye = torch.eye(width, dtype=dtype, device=device)
    torch.testing.assert_close(ln_gemm(dy, eye, prologue_a=grad)[0], du_ref, **kernel_tolerance(dtype))
    w = rand(n_out, width)
    torch.testing.assert_close(ln_gemm(dy, w.t(), prologue_a=grad)[0], du_ref @ w.t(), **kernel_tolerance(dtype))
    x = rand(tokens, n_out)
    torch.testing.assert_close(ln_gemm(dy.t(), x, prologue_a=grad.t())[0], du_ref.t() @ x, **kernel_tolerance(dtype))
    z = rand(tokens, 9)
    hidden, h = _prologue(z, 4, gelu, slope, scale)
    torch.testing.assert_close(
        ln_gemm(dy.t(), z, prologue_a=grad.t(), prologue_b=hidden)[0], du_ref.t() @ h, **kernel_tolerance(dtype)
    )


def test_ln_gemm_refuses_mismatched_prologues(device):
    dtype = exact_dtype(device)
    ones, zeros = torch.ones(5, device=device), torch.zeros(5, device=device)  # on the data's device (a GPU too)
    u, dy = torch.randn(6, 5, dtype=dtype, device=device), torch.randn(6, 5, dtype=dtype, device=device)
    stats = torch.stack([u.mean(1), torch.rsqrt(u.var(1, unbiased=False) + 1e-5)] * 2)
    grad, _, _ = ln_grad_sums(dy, u, LnPrologue(stats, ones, zeros, 2, False, 0.0, 1.0))
    with pytest.raises(ValueError, match="saved tensor"):
        ln_gemm(dy.t(), torch.randn(6, 3, dtype=dtype, device=device), prologue_a=grad)  # dy^T without grad.t()
    with pytest.raises(ValueError, match="gradient prologue goes on A"):
        ln_gemm(torch.randn(3, 6, dtype=dtype, device=device), dy, prologue_b=grad)
    with pytest.raises(ValueError, match="same activation"):
        ln_gemm(
            dy.t(),
            u,
            prologue_a=grad.t(),
            prologue_b=LnPrologue(stats, ones, zeros, 2, True, 0.0, 1.0),
        )
    with pytest.raises(ValueError, match=r"\[4, 6\]"):
        ln_grad_sums(dy, u, LnPrologue(stats[:, :5], ones, zeros, 2, False, 0.0, 1.0))


@pytest.mark.parametrize("case", sorted(LINEAR_CASES))
def test_triton_linear_matches_reference(device, case):
    dtype = exact_dtype(device)
    ref = pk.PNNHLinear(6, hidden_features=10, backend="reference", **LINEAR_CASES[case]).to(device=device, dtype=dtype)
    randomize_norms(ref)
    for shape in [(3, 4, 6), (1, 6), (6,)]:
        assert_matches_reference(ref, twin(ref, "triton"), torch.randn(shape, dtype=dtype, device=device), steps=1)


def test_triton_linear_gradcheck_and_opcheck(device):
    if device != "cpu":
        pytest.skip("gradcheck needs float64, which Triton's GPU dot lacks (checked in the interpreter)")
    block = pk.PNNHLinear(4, hidden_features=5, activation="gelu", backend="triton", tied=False).double()
    randomize_norms(block)
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    assert block_gradcheck(block, x, fast_mode=True)
    torch.library.opcheck(torch.ops.pnnh.linear_block_triton.default, op_args(block, x))


@pytest.mark.parametrize("autocast", [False, True], ids=["pure", "autocast"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_linear_low_precision_error_within_twice_eager(device, dtype, autocast):
    ref64 = pk.PNNHLinear(32, hidden_features=64, activation="gelu", backend="reference").to(
        device=device, dtype=torch.float64
    )
    randomize_norms(ref64)
    x64 = torch.randn(16, 32, dtype=torch.float64, device=device)
    errors = low_precision_errors(ref64, "triton", x64, dtype, autocast=autocast)
    assert errors["triton"] <= 2 * errors["eager"] + 1e-3, errors


def test_torch_compile_traces_the_triton_linear_without_graph_breaks(device):
    dtype = exact_dtype(device)
    block = pk.PNNHLinear(4, hidden_features=6, backend="triton").to(device=device, dtype=dtype)
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    assert_matches_reference(twin(block, "reference"), compiled, torch.randn(3, 4, dtype=dtype, device=device), steps=1)
