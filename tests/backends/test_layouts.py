"""channels_last end to end: a channels_last input stays channels_last through a stack of blocks, with
no layout copy of a feature map inside a block or between blocks, on every fused backend the CPU can
run ('cpu'; 'cuda''s op on the test-only CPU passes of the 'cuda' op; 'triton' in the interpreter). The 'cuda' op
also takes NCHW without a copy. Counted as aten copies (clone, copy_, same-dtype _to_copy) of at least
one map's worth of elements in a recorded training step."""

import pytest
import torch
from cuda_passes_on_cpu import run_cuda_op_on_cpu_kernels
from helpers import twin
from op_recording import training_step
from triton_devices import interpreting

import pnnh_kernels as pk
from pnnh_kernels._extension import extension_error
from pnnh_kernels.backends.cpu import CpuBackend
from pnnh_kernels.backends.cuda.conv import conv_block as cuda_conv_block

needs_extension = pytest.mark.skipif(extension_error() is not None, reason="no C++ extension")
BACKENDS = [
    pytest.param("cpu", marks=needs_extension),
    pytest.param("cuda_op", marks=needs_extension),
    pytest.param("triton", marks=pytest.mark.skipif(not interpreting(), reason="triton on CPU needs the interpreter")),
]
#: maps (N*H*W = 112 elements per channel) that outnumber every weight (the joint layer-1 weight of two
#: channels: (2 + 2) * 2 * 3 * 3 = 72), so a map-sized copy is a map's; small, for the Triton interpreter
SHAPE = (2, 2, 8, 7)
OPTIONS = {"default": {}, "coder_3x3": dict(coder_kernel_size=3), "untied": dict(tied=False)}


@pytest.fixture(autouse=True)
def _no_finite_check():
    pk.set_finite_check(False)  # its isfinite reduction is not a copy, but keep the recording to the block
    yield
    pk.set_finite_check(None)


def _stack(backend: str, options: dict, monkeypatch) -> torch.nn.Module:
    if backend == "cuda_op":  # the 'cuda' backend's op, run by the 'cpu' backend on the CPU passes of the 'cuda' op
        run_cuda_op_on_cpu_kernels(monkeypatch)
        monkeypatch.setattr(CpuBackend, "conv_op", lambda self: cuda_conv_block)
        backend = "cpu"
    blocks = [pk.PNNHConv2d(SHAPE[1], **options) for _ in range(2)]
    model = torch.nn.Sequential(*(twin(b, backend) for b in blocks)).double()
    n, _, h, w = SHAPE
    assert all(p.numel() < n * h * w for p in model.parameters()), "a weight as large as a map"
    return model


def _map_copies(model: torch.nn.Module, x: torch.Tensor) -> list:
    dy = torch.randn_like(x)  # in x's layout, as the next layer's gradient would be
    rec = training_step(model, x, dy)
    assert rec.launches > 0
    n, _, h, w = x.shape
    return rec.copies_of_at_least(n * h * w)


@pytest.mark.parametrize("options", sorted(OPTIONS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_channels_last_stays_channels_last_without_copies(backend, options, monkeypatch):
    model = _stack(backend, OPTIONS[options], monkeypatch)
    x = torch.randn(SHAPE, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    assert model(x).is_contiguous(memory_format=torch.channels_last)
    assert _map_copies(model, x) == []


@pytest.mark.parametrize("options", sorted(OPTIONS))
@pytest.mark.parametrize("backend", [pytest.param("cuda_op", marks=needs_extension)])
def test_the_cuda_op_takes_nchw_without_copies(backend, options, monkeypatch):
    model = _stack(backend, OPTIONS[options], monkeypatch)
    x = torch.randn(SHAPE, dtype=torch.float64)
    assert model(x).is_contiguous()
    assert _map_copies(model, x) == []


@pytest.mark.parametrize("backend", [pytest.param("cuda_op", marks=needs_extension)])
def test_the_copy_count_sees_a_layout_copy(backend, monkeypatch):
    """The check can fail: a block given a non-dense input must copy it into a layout, and it is seen."""
    model = _stack(backend, {}, monkeypatch)
    x = torch.randn(SHAPE[0], 2 * SHAPE[1], *SHAPE[2:], dtype=torch.float64)[:, ::2]
    assert _map_copies(model, x) != []
