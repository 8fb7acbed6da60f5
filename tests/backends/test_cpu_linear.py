"""The 'cpu' backend's PNNHLinear (backends/cpu/linear.py) against the reference, and its layer-norm +
activation passes (csrc/cpu/ln_act_rows.cpp) against autograd."""

import pytest
import torch
from accuracy import assert_float32_close
from helpers import (
    LINEAR_CASES,
    assert_matches_reference,
    op_args,
    randomize_norms,
    twin,
)

import pnnh_kernels as pk
from pnnh_kernels._extension import extension, extension_error

pytestmark = pytest.mark.skipif(extension_error() is not None, reason=f"C++ extension unavailable: {extension_error()}")


@pytest.mark.parametrize("case", sorted(LINEAR_CASES))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cpu_linear_matches_reference(case, dtype):
    ref = pk.PNNHLinear(6, hidden_features=10, backend="reference", **LINEAR_CASES[case]).to(dtype)
    randomize_norms(ref)
    for shape in [(3, 4, 6), (1, 6), (6,)]:
        assert_matches_reference(ref, twin(ref, "cpu"), torch.randn(shape, dtype=dtype))


def test_cpu_linear_gradcheck_and_opcheck():
    block = pk.PNNHLinear(4, hidden_features=5, activation="gelu", backend="cpu").double()
    randomize_norms(block)
    names = [n for n, _ in block.named_parameters()]

    def fn(x, *params):
        return torch.func.functional_call(block, dict(zip(names, params)), (x,))

    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(fn, (x, *block.parameters()))
    torch.library.opcheck(torch.ops.pnnh.linear_block_cpu.default, op_args(block, x))


def _ln_act_autograd(z, c0, cn, gamma, beta, kind, slope, scale, use_act):
    """act(LN(z[:, c0:c0+cn])) in float64 autograd: the pass's reference."""
    y = torch.nn.functional.layer_norm(z[:, c0 : c0 + cn], (cn,), gamma, beta, 1e-5)
    if not use_act:
        return y
    return scale * (torch.nn.functional.gelu(y) if kind == 1 else torch.nn.functional.leaky_relu(y, slope))


def _ln_act_results(tensors: tuple, dy: torch.Tensor, c0: int, width: int, act: tuple) -> dict:
    """The pass's outputs (y, dz, dgamma, dbeta) by autograd, in the dtype of ``tensors`` (z, gamma, beta)."""
    kind, slope, scale, use_act = act
    leaves = [t.clone().requires_grad_() for t in tensors]
    y = _ln_act_autograd(leaves[0], c0, width, *leaves[1:], kind, slope, scale, use_act)
    y.backward(dy)
    return {"y": y.detach(), "dz": leaves[0].grad, "dgamma": leaves[1].grad, "dbeta": leaves[2].grad}


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
    exact_inputs = tuple(t.double() for t in (z, gamma, beta))  # the kernel's own (rounded) inputs
    expected = _ln_act_results(exact_inputs, dy.double(), c0, width, act)
    # float32: judged against float64, bounded by the same autograd computation in float32 (accuracy.py)
    plain = _ln_act_results((z, gamma, beta), dy, c0, width, act) if dtype == torch.float32 else None
    assert out[:, :4].abs().sum() == 0 and out[:, 4 + width :].abs().sum() == 0  # nothing written outside the range

    dz = torch.zeros_like(z)
    partial = C.ln_act_backward(dy, 0, z, c0, width, stats, gamma, beta, dz, use_act, kind, slope, scale)
    got = (out[:, 4 : 4 + width], dz, *partial.sum(0))
    for name, actual in zip(("y", "dz", "dgamma", "dbeta"), got):
        exact = expected[name]
        if plain is None:
            torch.testing.assert_close(actual, exact, rtol=1e-12, atol=1e-12, msg=lambda m, name=name: f"{name}: {m}")
        else:
            assert_float32_close(actual, exact, plain[name], name)


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
