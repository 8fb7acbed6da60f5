"""cuDNN's fused graphs against PyTorch (GPU; skipped without one or without a build with the frontend).

Where cuDNN has no engine for a shape the test says so with cuDNN's reason (a skip, which the GPU session's
log records), instead of failing: which patterns exist is what the probe measures.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pnnh_kernels.backends.cuda import cudnn_fused

needs_gpu = pytest.mark.skipif(
    not (torch.cuda.is_available() and cudnn_fused.available()), reason="needs a GPU and a build with cudnn-frontend"
)


@pytest.mark.skipif(cudnn_fused.available(), reason="this build has the fused graphs")
def test_a_build_without_the_frontend_says_so():
    assert "without the cudnn-frontend headers" in cudnn_fused.support(
        (1, 8, 4, 4), (8, 8, 3, 3), torch.half, prologue=True
    )
    with pytest.raises(RuntimeError, match="nvidia-cudnn-frontend"):
        cudnn_fused.conv_genstats(torch.zeros(1, 8, 4, 4), torch.zeros(8, 8, 3, 3))
    assert "without the cudnn-frontend headers" in cudnn_fused.dgrad_support((1, 8, 4, 4), (8, 8, 3, 3), torch.half)
    with pytest.raises(RuntimeError, match="nvidia-cudnn-frontend"):
        vec = torch.ones(8)
        cudnn_fused.dgrad_drelu_dbn(
            torch.zeros(1, 8, 4, 4), torch.zeros(8, 8, 3, 3), torch.zeros(1, 8, 4, 4), *[vec] * 4
        )


def _expected(x, w, scale, bias, slope):
    inp = x.float()
    if scale is not None:
        inp = F.leaky_relu(inp * scale.view(1, -1, 1, 1) + bias.view(1, -1, 1, 1), slope)
    y = F.conv2d(inp.to(x.dtype), w, padding=w.shape[-1] // 2).float()
    return y, y.sum((0, 2, 3)), y.pow(2).sum((0, 2, 3))


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("prologue", [False, True])
@pytest.mark.parametrize("slope", [0.0, 0.2])
@pytest.mark.parametrize("shape", [(8, 32, 16, 16, 32, 3), (4, 64, 8, 8, 64, 1), (2, 16, 32, 32, 16, 3)])
def test_fused_conv_matches_pytorch(dtype, prologue, slope, shape):
    if slope and not prologue:
        pytest.skip("the slope belongs to the prologue")
    n, c, h, w_, k, r = shape
    reason = cudnn_fused.support((n, c, h, w_), (k, c, r, r), dtype, prologue=prologue, slope=slope)
    if reason:
        pytest.skip(f"cuDNN has no engine: {reason}")
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(n, c, h, w_, device="cuda", generator=gen).to(dtype).to(memory_format=torch.channels_last)
    w = (torch.randn(k, c, r, r, device="cuda", generator=gen) * (c * r * r) ** -0.5).to(dtype)
    w = w.to(memory_format=torch.channels_last)
    scale = torch.rand(c, device="cuda", generator=gen) + 0.5 if prologue else None
    bias = torch.randn(c, device="cuda", generator=gen) * 0.1 if prologue else None
    out = cudnn_fused.conv_genstats(x, w, scale, bias, slope)
    y, s, sq = _expected(x, w, scale, bias, slope)
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=5e-3, atol=5e-3)
    torch.testing.assert_close(out.y.float(), y, **tol)
    count = n * h * w_
    torch.testing.assert_close(out.sum / count, s / count, **tol)
    torch.testing.assert_close(out.sq_sum / count, sq / count, **tol)
    assert out.y.is_contiguous(memory_format=torch.channels_last)


@needs_gpu
def test_a_half_scale_and_bias_pair_is_required():
    x = torch.randn(2, 16, 8, 8, device="cuda", dtype=torch.float16).to(memory_format=torch.channels_last)
    w = torch.randn(16, 16, 3, 3, device="cuda", dtype=torch.float16).to(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match="give both scale and bias"):
        cudnn_fused.conv_genstats(x, w, torch.ones(16, device="cuda"), None)


def _expected_backward(dy, w, x, gamma, beta, slope, eps):
    """Autograd of conv(act(batch_norm(x)), w) in float32: (BN output's gradient, dgamma, dbeta, dx)."""
    xf = x.float().requires_grad_()
    g, b = gamma.clone().requires_grad_(), beta.clone().requires_grad_()
    bn = F.batch_norm(xf, None, None, g, b, training=True, eps=eps)
    bn.retain_grad()
    y = F.conv2d(F.leaky_relu(bn, slope), w.float(), padding=w.shape[-1] // 2)
    y.backward(dy.float())
    return bn.grad, g.grad, b.grad, xf.grad


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("slope", [0.0, 0.2])
@pytest.mark.parametrize("shape", [(8, 32, 16, 16, 32, 3), (4, 64, 8, 8, 32, 1), (2, 16, 32, 32, 16, 3)])
def test_fused_dgrad_drelu_dbn_matches_autograd(dtype, slope, shape):
    n, c, h, w_, k, r = shape
    reason = cudnn_fused.dgrad_support((n, c, h, w_), (k, c, r, r), dtype, slope=slope)
    if reason:
        pytest.skip(f"cuDNN has no engine: {reason}")
    gen = torch.Generator(device="cuda").manual_seed(0)
    cl = torch.channels_last
    x = (torch.randn(n, c, h, w_, device="cuda", generator=gen) * 2 + 0.5).to(dtype).to(memory_format=cl)
    w = (torch.randn(k, c, r, r, device="cuda", generator=gen) * (c * r * r) ** -0.5).to(dtype).to(memory_format=cl)
    dy = torch.randn(n, k, h, w_, device="cuda", generator=gen).to(dtype).to(memory_format=cl)
    gamma = torch.rand(c, device="cuda", generator=gen) + 0.5
    beta = torch.randn(c, device="cuda", generator=gen) * 0.1
    eps = 1e-5
    xf = x.float()
    mean = xf.mean((0, 2, 3))
    invstd = torch.rsqrt(xf.var((0, 2, 3), unbiased=False) + eps)
    out = cudnn_fused.dgrad_drelu_dbn(dy, w, x, mean, invstd, gamma, beta, slope)
    d_act, dgamma, dbeta, dx = _expected_backward(dy, w, x, gamma, beta, slope, eps)
    tol = dict(rtol=3e-2, atol=3e-2) if dtype == torch.bfloat16 else dict(rtol=1e-2, atol=1e-2)
    count = n * h * w_
    torch.testing.assert_close(out.d_act.float(), d_act, **tol)
    torch.testing.assert_close(out.dgamma / count, dgamma / count, **tol)
    torch.testing.assert_close(out.dbeta / count, dbeta / count, **tol)
    torch.testing.assert_close(out.dx(x).float(), dx, **tol)
    assert out.d_act.is_contiguous(memory_format=cl)


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("autocast", [False, True], ids=["pure", "autocast"])
def test_the_cuda_op_with_cudnn_fusion_is_as_accurate_as_eager(dtype, autocast, monkeypatch):
    """The 'cuda' backend on channels_last half data sends its forward convolutions to cuDNN's graphs where
    cuDNN has an engine (backends/cuda/cudnn_layers.py); its error against float64 stays within twice
    eager's, with the fusion on and off."""
    from helpers import low_precision_errors, randomize_norms

    import pnnh_kernels as pk
    from pnnh_kernels.backends.cuda import cudnn_layers

    calls = []
    real = cudnn_fused.conv_genstats
    monkeypatch.setattr(cudnn_fused, "conv_genstats", lambda *args, **kw: calls.append(1) or real(*args, **kw))
    ref64 = pk.PNNHConv2d(32, backend="reference").to(device="cuda", dtype=torch.float64)
    randomize_norms(ref64)
    x64 = torch.randn(8, 32, 16, 16, dtype=torch.float64, device="cuda").contiguous(memory_format=torch.channels_last)
    try:
        for enabled in (True, False):
            cudnn_layers.set_cudnn_fusion(enabled)
            errors = low_precision_errors(ref64, "cuda", x64, dtype, autocast=autocast)
            if enabled and not calls:
                reason = cudnn_fused.support((8, 32, 16, 16), (32, 32, 3, 3), dtype, prologue=True)
                pytest.skip(f"cuDNN fuses neither layer of this block: {reason}")
            assert errors["cuda"] <= 2 * errors["eager"] + 1e-3, (enabled, errors)
    finally:
        cudnn_layers.set_cudnn_fusion(None)
