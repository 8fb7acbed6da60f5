"""PNNHConv2d / PNNHLinear as modules: drop-in shapes, shared coders, state dicts, torch.compile."""

import importlib.util
import subprocess
import sys

import pytest
import torch
from accuracy import assert_float32_close
from helpers import assert_matches_reference, randomize_norms, twin
from torch import nn

import pnnh_kernels as pk
from pnnh_kernels._extension import extension_error


def test_drop_in_for_a_stride1_basic_block():
    x = torch.randn(2, 16, 8, 8)
    block = pk.PNNHConv2d(16)
    assert block(x).shape == x.shape
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), block, pk.PNNHConv2d(16), nn.AdaptiveAvgPool2d(1))
    assert model(torch.randn(2, 3, 8, 8)).shape == (2, 16, 1, 1)


def test_shared_coder_is_one_set_of_weights():
    coder = pk.PNNHCoder(8, 8, 1)
    a, b = pk.PNNHConv2d(8, coder=coder), pk.PNNHConv2d(8, coder=coder)
    stage = nn.Sequential(a, b)
    assert a.coder.encoder is b.coder.encoder
    n_params = sum(p.numel() for p in stage.parameters())
    n_unshared = sum(p.numel() for p in nn.Sequential(pk.PNNHConv2d(8), pk.PNNHConv2d(8)).parameters())
    assert n_unshared - n_params == coder.encoder.numel()
    stage(torch.randn(2, 8, 4, 4)).sum().backward()
    # the shared encoder's gradient is the sum of both blocks' contributions
    grad_both = coder.encoder.grad.clone()
    coder.encoder.grad = None
    for m in (a, b):
        for p in m.parameters():
            p.grad = None
    b(a(torch.randn(2, 8, 4, 4))).sum().backward()
    assert coder.encoder.grad is not None and grad_both.abs().sum() > 0


def test_state_dict_uses_batchnorm_names_and_counts_batches():
    block = pk.PNNHConv2d(4).train()
    block(torch.randn(2, 4, 3, 3))
    block(torch.randn(2, 4, 3, 3))
    state = block.state_dict()
    for part in ("coder_norm", "learner_norm", "out_norm"):
        assert int(state[f"{part}.num_batches_tracked"]) == 2
        assert f"{part}.running_var" in state
    assert {"coder.encoder", "learner1_weight", "learner2_weight"} <= set(state)
    clone = pk.PNNHConv2d(4)
    clone.load_state_dict(state)
    clone.eval(), block.eval()
    x = torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(clone(x), block(x))


def test_eval_mode_uses_running_statistics():
    block = pk.PNNHConv2d(4).eval()
    before = block.out_norm.running_mean.clone()
    x = torch.randn(3, 4, 5, 5) * 3 + 1
    y1 = block(x[:1])
    y_all = block(x)
    torch.testing.assert_close(y_all[:1], y1)  # per-sample result: no batch statistics in eval
    assert torch.equal(block.out_norm.running_mean, before)


def test_parameters_and_init():
    block = pk.PNNHConv2d(8, hidden_channels=12, coder_channels=6)
    names = {n: tuple(p.shape) for n, p in block.named_parameters()}
    assert names["coder.encoder"] == (6, 8, 1, 1)
    assert names["learner1_weight"] == (12, 8, 3, 3)
    assert names["learner2_weight"] == (8, 12, 3, 3)
    enc = block.coder.encoder.flatten(1)
    torch.testing.assert_close(enc @ enc.t(), torch.eye(6), atol=1e-5, rtol=0)  # orthonormal rows
    assert block.learner1_bias is None  # batch norm makes a bias redundant
    assert pk.PNNHConv2d(8, norm="none").learner1_bias is not None


def test_linear_defaults_follow_the_transformer_mlp():
    mlp = pk.PNNHLinear(32)
    assert (mlp.in_features, mlp.hidden_features, mlp.out_features) == (32, 128, 32)
    assert isinstance(mlp.out_norm, nn.LayerNorm)
    assert mlp(torch.randn(2, 5, 32)).shape == (2, 5, 32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("training", [True, False])
def test_low_precision_modules_match_float64_within_the_dtypes_error(dtype, training):
    # errors of a correct block are ~8 eps here (two convolutions, three norms); a wrong one is O(1)
    ref = pk.PNNHConv2d(4, backend="reference").double().train(training)
    randomize_norms(ref)
    block = twin(ref, "auto").to(dtype)
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    y = block(x.to(dtype))
    assert y.dtype == dtype
    tol = 16 * torch.finfo(dtype).eps
    torch.testing.assert_close(y.double(), ref(x), rtol=tol, atol=tol)


@pytest.mark.slow
def test_torch_compile_traces_the_block_without_graph_breaks():
    block = pk.PNNHConv2d(4, backend="eager").double().train()
    reference = twin(block, "reference")
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    assert_matches_reference(reference, compiled, x, steps=1)


@pytest.mark.parametrize("backend", ["reference", "eager"])
def test_running_statistics_match_torch_batchnorm(backend):
    """An independent composition from torch.nn.BatchNorm2d modules gives the same output and buffers."""
    import copy

    import torch.nn.functional as F

    block = pk.PNNHConv2d(4, backend=backend, momentum=0.3).double().train()
    bn_c, bn_1, bn_2 = (copy.deepcopy(n) for n in (block.coder_norm, block.learner_norm, block.out_norm))
    for _ in range(3):
        x = torch.randn(2, 4, 5, 5, dtype=torch.float64) * 2 + 0.5
        z_c = bn_c(F.conv2d(x, block.coder.encoder))
        a_l = F.relu(bn_1(F.conv2d(x, block.learner1_weight, padding=1)))
        expected = F.relu(
            bn_2(F.conv_transpose2d(z_c, block.coder.encoder) + F.conv2d(a_l, block.learner2_weight, padding=1))
        )
        torch.testing.assert_close(block(x), expected)
    for mine, theirs in zip((block.coder_norm, block.learner_norm, block.out_norm), (bn_c, bn_1, bn_2)):
        torch.testing.assert_close(mine.running_mean, theirs.running_mean)
        torch.testing.assert_close(mine.running_var, theirs.running_var)
        assert int(mine.num_batches_tracked) == int(theirs.num_batches_tracked) == 3


@pytest.mark.parametrize("backend", ["eager", "cpu"])
def test_torch_export_captures_the_block(backend):
    # torch.export is a supported path (TorchScript is not): the exported program computes the same block
    block = pk.PNNHConv2d(4, backend=backend).eval()
    randomize_norms(block)
    x = torch.randn(2, 4, 5, 5)
    program = torch.export.export(block, (x,))
    exact = twin(block, "reference").double()(x.double())  # float32 judged against float64 (accuracy.py)
    assert_float32_close(program.module()(x), exact, twin(block, "eager")(x))


_SAVE = """
import sys, torch, pnnh_kernels as pk
torch.manual_seed(0)
block = pk.PNNHConv2d(4, backend="cpu").eval()
x = torch.randn(2, 4, 5, 5)
torch.export.save(torch.export.export(block, (x,)), sys.argv[1])
torch.save((x, block(x)), sys.argv[1] + ".io")
"""
_LOAD = """
import sys, torch, pnnh_kernels
program = torch.export.load(sys.argv[1])  # in a process that has not run a block
x, y = torch.load(sys.argv[1] + ".io")
print(torch.equal(program.module()(x), y))
"""


@pytest.mark.skipif(extension_error() is not None, reason="needs the C++ extension")
def test_a_saved_program_with_fused_ops_loads_in_a_fresh_process(tmp_path):
    path = str(tmp_path / "block.pt2")
    for script in (_SAVE, _LOAD):  # run outside the source tree: the installed package, as a user has it
        done = subprocess.run(
            [sys.executable, "-c", script, path], capture_output=True, text=True, check=False, cwd=tmp_path
        )
        assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "True"


def test_every_fused_op_is_defined_once_the_package_is_imported(tmp_path):
    script = "import torch, pnnh_kernels; print(' '.join(sorted(dir(torch.ops.pnnh))))"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=tmp_path)
    defined = set(done.stdout.split())
    expected = {"conv_block_cpu", "linear_block_cpu", "conv_block_cuda"}
    if importlib.util.find_spec("triton") is not None:
        expected |= {"conv_block_triton", "linear_block_triton"}
    assert expected | {f"{name}_backward" for name in expected} <= defined
