"""Forward and forward+backward of the PNNH conv and linear blocks: every backend against the baselines."""

import pytest
import torch
from bench_shapes import LAYOUTS, chosen, parametrize_shapes, run_device
from bench_utils import conv_block_bytes, conv_block_flops, linear_block_bytes, linear_block_flops
from timing import measure
from variants import BASELINES, conv_variant, fused_backends, interpreted, linear_variant


def _dtypes(device):
    return [torch.float32] if device == "cpu" else [torch.bfloat16, torch.float16, torch.float32]


def _variants():
    return list(BASELINES) + fused_backends()


def pytest_generate_tests(metafunc):
    config = metafunc.config
    device = run_device()
    parametrize_shapes(metafunc, "conv_shape", "linear_shape")
    if "dtype" in metafunc.fixturenames:
        names = chosen(config, "--bench-dtype", [str(d).replace("torch.", "") for d in _dtypes(device)])
        dtypes = [getattr(torch, n) for n in names]
        metafunc.parametrize("dtype", dtypes, ids=[str(d).replace("torch.", "") for d in dtypes])
    if "variant" in metafunc.fixturenames:
        metafunc.parametrize("variant", _variants())
    if "layout" in metafunc.fixturenames:
        layouts = chosen(config, "--bench-layout", list(LAYOUTS))
        metafunc.parametrize("layout", layouts)
    if "pass_name" in metafunc.fixturenames:
        metafunc.parametrize("pass_name", ["fwd", "fwd+bwd"])


def _compile_allowed(mode, device, label):
    # inductor on a 2-core CPU takes about a minute per shape: quick runs compile the middle CIFAR stage
    # only; the smoke run skips it (tests/ check that torch.compile traces the block)
    if mode == "smoke":
        return False
    return mode != "quick" or device == "cuda" or label == "cifar-stage2"


def _run(
    benchmark,
    collector,
    kind,
    shape,
    dims,
    width,
    dtype,
    variant,
    pass_name,
    make_variant,
    flops,
    traffic,
    layout="nchw",
):
    if interpreted(variant, collector.device):
        pytest.skip("the Triton interpreter (TRITON_INTERPRET=1) is a correctness tool: not timed")
    torch.manual_seed(0)
    x = shape.input(dtype, collector.device)
    if layout != "nchw":
        x = x.detach().contiguous(memory_format=LAYOUTS[layout]).requires_grad_()
    fn, reason = make_variant(variant, width, x)
    if fn is None:
        pytest.skip(reason)
    benchmark.group = f"{kind} {shape.label} {dtype} {layout} {pass_name}"
    record = dict(
        kind=kind, shape=shape.label, dims=dims, dtype=str(dtype).replace("torch.", ""), variant=variant, layout=layout
    )
    measure(benchmark, collector, fn, x, pass_name, record, flops, traffic)


def test_conv_block(benchmark, collector, conv_shape, dtype, layout, variant, pass_name):
    if variant == "compile" and not _compile_allowed(collector.mode, collector.device, conv_shape.label):
        pytest.skip("torch.compile runs on cifar-stage2 only in the quick CPU set (--bench-full for all)")
    s = conv_shape
    coder = variant != "residual"
    flops = conv_block_flops(s, coder_kernel=1 if coder else 0)
    size = torch.empty((), dtype=dtype).element_size()
    traffic = {p: conv_block_bytes(s, size, p == "fwd+bwd", coder) for p in ("fwd", "fwd+bwd")}
    _run(
        benchmark,
        collector,
        "conv",
        s,
        [s.batch, s.channels, s.size, s.size],
        s.channels,
        dtype,
        variant,
        pass_name,
        conv_variant,
        flops,
        traffic,
        layout,
    )


def test_linear_block(benchmark, collector, linear_shape, dtype, variant, pass_name):
    if variant == "compile" and (
        collector.mode == "smoke" or (collector.mode == "quick" and collector.device == "cpu")
    ):
        pytest.skip("torch.compile of the linear block is in the full set only on CPU")
    s = linear_shape
    size = torch.empty((), dtype=dtype).element_size()
    traffic = {p: linear_block_bytes(s, size, p == "fwd+bwd") for p in ("fwd", "fwd+bwd")}
    _run(
        benchmark,
        collector,
        "linear",
        s,
        [s.tokens, s.dim],
        s.dim,
        dtype,
        variant,
        pass_name,
        linear_variant,
        linear_block_flops(s),
        traffic,
    )
