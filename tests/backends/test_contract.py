"""The op contract (backends/contract.py): every fused op takes BlockArgs by name and returns its gradients
in BlockGrads order, and a second differentiation through any fused backend fails with a clear message."""

import importlib

import pytest
import torch
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


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("kind", ["conv", "linear"])
@pytest.mark.parametrize("penalty", ["square", "sum"], ids=["dy_needs_grad", "dy_constant"])
def test_double_backward_is_refused_with_a_message(backend, kind, penalty):
    block, x = _block(kind, backend)
    x.requires_grad_()
    y = block(x)
    loss = y.pow(2).sum() if penalty == "square" else y.sum()
    (g,) = torch.autograd.grad(loss, x, create_graph=True)
    with pytest.raises(RuntimeError, match=f"the '{backend}' backend computes first-order gradients only.*eager"):
        g.pow(2).sum().backward()


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_first_order_gradients_under_create_graph_are_the_plain_ones(backend, kind):
    block, x = _block(kind, backend)
    x.requires_grad_()
    (plain,) = torch.autograd.grad(block(x).pow(2).sum(), x)
    (graphed,) = torch.autograd.grad(block(x).pow(2).sum(), x, create_graph=True)
    torch.testing.assert_close(graphed.detach(), plain, rtol=0, atol=0)


def test_eager_computes_the_double_backward_the_fused_backends_refuse():
    block, x = _block("conv", "eager")
    x.requires_grad_()
    (g,) = torch.autograd.grad(block(x).pow(2).sum(), x, create_graph=True)
    g.pow(2).sum().backward()
    assert block.learner2_weight.grad is not None and block.learner2_weight.grad.abs().max() > 0
