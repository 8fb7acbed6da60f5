"""A reparameterized PNNH net leaves PyTorch with no custom op: torch.export, and ONNX run by onnxruntime
(the `deploy` extra) matching PyTorch within 1e-4."""

import pytest
import torch
from helpers import randomize_norms

import pnnh_kernels as pk
from pnnh_kernels import reparameterize_model
from pnnh_kernels._extension import extension_error
from pnnh_kernels.models import create_model


def _model(name: str = "pnnh_resnet20") -> torch.nn.Module:
    torch.manual_seed(0)
    options = dict(img_size=16, patch_size=4, depth=2) if "vit" in name else {}
    model = create_model(name, num_classes=10, **options)
    randomize_norms(model, seed=1)
    return model.eval()


def _call_targets(program: torch.export.ExportedProgram) -> set[str]:
    return {str(n.target) for n in program.graph.nodes if n.op == "call_function"}


@pytest.mark.parametrize("form", ["fast", "plain"])
def test_torch_export_of_a_reparameterized_net_holds_no_custom_op(form):
    model = _model()
    for block in model.modules():
        if isinstance(block, pk.PNNHConv2d) and extension_error() is None:
            block.backend = "cpu"  # trained on a fused backend: its custom op must not reach the graph
    x = torch.randn(2, 3, 16, 16)
    program = torch.export.export(reparameterize_model(model, form=form), (x,))
    assert not [t for t in _call_targets(program) if "pnnh" in t]
    torch.testing.assert_close(program.module()(x), model(x), rtol=1e-5, atol=1e-5)


def _onnx_outputs(model: torch.nn.Module, x: torch.Tensor, path) -> torch.Tensor:
    ort = pytest.importorskip("onnxruntime", reason="the deploy extra: pip install 'pnnh_kernels[deploy]'")
    pytest.importorskip("onnxscript")
    torch.onnx.export(model, (x,), dynamo=True, verbose=False).save(str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])


@pytest.mark.parametrize("form", ["fast", "plain"])
@pytest.mark.parametrize("name", ["pnnh_resnet20", "pnnh_slim_resnet50", "pnnh_vit_tiny"])
def test_onnxruntime_runs_the_exported_net_as_pytorch_does(tmp_path, name, form):
    model = _model(name)
    x = torch.randn(2, 3, 16, 16)
    got = _onnx_outputs(reparameterize_model(model, form=form), x, tmp_path / "net.onnx")
    with torch.no_grad():
        want = model(x)
    assert ((got - want).abs().max() / want.abs().max()).item() < 1e-4


@pytest.mark.skipif(extension_error() is not None, reason="needs the C++ extension (a fused backend)")
def test_onnx_export_of_a_net_on_a_fused_backend_records_standard_operators(tmp_path):
    """Without reparameterizing: the blocks export eager's operators instead of their custom ops."""
    model = _model()
    for block in model.modules():
        if isinstance(block, pk.PNNHConv2d):
            block.backend = "cpu"
    x = torch.randn(2, 3, 16, 16)
    got = _onnx_outputs(model, x, tmp_path / "net.onnx")
    with torch.no_grad():
        want = model(x)
    assert ((got - want).abs().max() / want.abs().max()).item() < 1e-4


@pytest.mark.parametrize("name", ["pnnh_resnet20", "resnet20"])
def test_an_int8_file_runs_every_convolution_quantized(tmp_path, name):
    """`pnnh-train export --quantize int8`'s quantization (uint8 activations): after onnxruntime's graph
    optimizations every convolution is a QLinearConv. With int8 activations its CPU provider kept the
    convolutions that feed an addition (the fast form's coder path, a ResNet block) in float32."""
    ort = pytest.importorskip("onnxruntime", reason="the deploy extra: pip install 'pnnh_kernels[deploy]'")
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    from pnnh_kernels.train.export import _quantize_file

    x = torch.randn(2, 3, 16, 16)
    float_path, int8_path, optimized_path = (str(tmp_path / f) for f in ("net.onnx", "int8.onnx", "opt.onnx"))
    torch.onnx.export(reparameterize_model(_model(name)), (x,), dynamo=True, verbose=False).save(float_path)
    _quantize_file(float_path, int8_path, [torch.randn_like(x) for _ in range(2)])
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED  # not the layout passes
    options.optimized_model_filepath = optimized_path
    ort.InferenceSession(int8_path, options, providers=["CPUExecutionProvider"])
    ops = [node.op_type for node in onnx.load(optimized_path).graph.node]
    assert "Conv" not in ops and ops.count("QLinearConv") >= 19, sorted(ops)
