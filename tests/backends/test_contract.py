"""The op contract (backends/contract.py): every fused op takes BlockArgs by name and returns its gradients
in BlockGrads order, and every fused backend serves second-order gradients (create_graph=True) through a
differentiable recompute."""

import importlib

import pytest
import torch
from accuracy import assert_float32_close
from helpers import randomize_norms, twin
from triton_devices import interpreting

import pnnh_kernels as pk
from pnnh_kernels._extension import extension_error
from pnnh_kernels.backends import registered_backends
from pnnh_kernels.backends.contract import BlockArgs, BlockGrads

FUSED = [
    pytest.param("cpu", marks=pytest.mark.skipif(extension_error() is not None, reason="C++ extension unavailable")),
    pytest.param(
        "triton", marks=pytest.mark.skipif(not interpreting(), reason="triton runs on CPU only when interpreted")
    ),
]
#: (backend, block kind): every fused op lives in backends/<backend>/<kind>.py, which exports ``<kind>_block``
#: (registered as ``pnnh::<kind>_block_<backend>``) and its record ``<Kind>Saved``
OPS = [("cpu", "conv"), ("cpu", "linear"), ("cuda", "conv"), ("triton", "conv"), ("triton", "linear")]


def _op_module(backend: str, kind: str):
    if backend == "triton":
        pytest.importorskip("triton")
    return importlib.import_module(f"pnnh_kernels.backends.{backend}.{kind}")


@pytest.mark.parametrize(("backend", "kind"), OPS)
def test_every_backend_exports_its_ops_under_the_same_names(backend, kind):
    module = _op_module(backend, kind)
    op = getattr(module, f"{kind}_block")
    assert op.name == f"{kind}_block_{backend}"
    assert op.record is getattr(module, f"{kind.capitalize()}Saved")
    served = registered_backends()[backend]
    assert (served.conv_op() if kind == "conv" else served.linear_op()) is op


@pytest.mark.parametrize(("backend", "kind"), OPS)
def test_every_op_takes_the_contracts_arguments_by_name(backend, kind):
    name = _op_module(backend, kind).__dict__[f"{kind}_block"].name
    forward = getattr(torch.ops.pnnh, name).default._schema
    backward = getattr(torch.ops.pnnh, f"{name}_backward").default._schema
    assert [a.name for a in forward.arguments] == list(BlockArgs._fields)
    assert forward.returns[0].name == "y"
    names = [a.name for a in backward.arguments]
    assert names[0] == "dy" and names[1 : 1 + len(BlockGrads._fields)] == list(BlockGrads._fields)
    assert names[-1] == "need_dx"


def _block(kind: str, backend: str):
    if kind == "conv":
        return pk.PNNHConv2d(4, hidden_channels=5, backend=backend).double(), torch.randn(
            2, 4, 5, 5, dtype=torch.float64
        )
    return pk.PNNHLinear(4, hidden_features=5, backend=backend).double(), torch.randn(6, 4, dtype=torch.float64)


def _second_order(block, x, penalty: str) -> list[torch.Tensor]:
    """The gradients of a gradient penalty (||d loss / dx||^2) with respect to x and every parameter."""
    x = x.detach().requires_grad_()
    y = block(x)
    loss = y.pow(2).sum() if penalty == "square" else (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum()
    (g,) = torch.autograd.grad(loss, x, create_graph=True)
    return list(torch.autograd.grad(g.pow(2).sum(), [x, *block.parameters()], allow_unused=True))


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("kind", ["conv", "linear"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("penalty", ["square", "linear"], ids=["dy_needs_grad", "dy_constant"])
def test_double_backward_matches_eager(backend, kind, training, penalty):
    """Gradient penalties, R1, MAML: the fused op's backward under create_graph=True recomputes the block with
    differentiable ops, so its second-order gradients are eager's (float64)."""
    block, x = _block(kind, backend)
    randomize_norms(block)
    block.train(training)
    eager = twin(block, "eager")
    for got, want in zip(_second_order(block, x, penalty), _second_order(eager, x, penalty)):
        assert (got is None) == (want is None)
        if got is not None:
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize(
    "backend, kind",
    [("cpu", "conv"), ("cpu", "linear"), ("triton", "linear")],  # the interpreter: the small case only
)
def test_gradgradcheck_through_a_fused_op(backend, kind):
    if backend == "cpu" and extension_error() is not None:
        pytest.skip("C++ extension unavailable")
    if backend == "triton" and not interpreting():
        pytest.skip("triton runs on CPU only when interpreted")
    torch.manual_seed(0)
    if kind == "conv":
        block, x = pk.PNNHConv2d(2, hidden_channels=3, backend=backend).double(), torch.randn(2, 2, 3, 3)
    else:
        block, x = pk.PNNHLinear(3, hidden_features=4, backend=backend).double(), torch.randn(3, 3)
    x = x.double().requires_grad_()
    assert torch.autograd.gradgradcheck(block, (x,), eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.skipif(extension_error() is not None, reason="C++ extension unavailable")
@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_double_backward_in_float32_is_as_accurate_as_eagers(kind):
    """float32 second-order gradients against float64, within the bound eager's own float32 ones set."""
    block64, x64 = _block(kind, "reference")
    randomize_norms(block64)
    exact = _second_order(block64, x64, "square")
    fused, eager = twin(block64, "cpu").float(), twin(block64, "eager").float()
    for got, baseline, want in zip(
        _second_order(fused, x64.float(), "square"), _second_order(eager, x64.float(), "square"), exact
    ):
        assert_float32_close(got, want, baseline)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_first_order_gradients_run_the_kernels_and_agree_under_create_graph(backend, kind):
    block, x = _block(kind, backend)
    x.requires_grad_()
    (plain,) = torch.autograd.grad(block(x).pow(2).sum(), x)
    (graphed,) = torch.autograd.grad(block(x).pow(2).sum(), x, create_graph=True)
    torch.testing.assert_close(graphed.detach(), plain, rtol=1e-9, atol=1e-11)


def test_eager_computes_the_double_backward():
    block, x = _block("conv", "eager")
    x.requires_grad_()
    (g,) = torch.autograd.grad(block(x).pow(2).sum(), x, create_graph=True)
    g.pow(2).sum().backward()
    assert block.learner2_weight.grad is not None and block.learner2_weight.grad.abs().max() > 0
