"""The Triton kernels one by one (triton_kernels/) against PyTorch: convolution as implicit GEMM in every
layout / stride / padding and its weight gradient, the fused prologues, the statistics epilogues and
their finalisation, the row passes, the weight packing. On the CPU they run under ``TRITON_INTERPRET=1``
(how CI runs them; tiny shapes, the interpreter is slow); on a CUDA machine, compiled."""

import importlib.util

import pytest
import torch
import torch.nn.functional as F

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)

import triton
import triton.language as tl
from triton_devices import exact_dtype, kernel_tolerance, requires_a_device

from pnnh_kernels.triton_kernels import (
    Prologue,
    bn_act_backward_sums,
    bn_act_forward,
    conv2d_implicit_gemm,
    conv2d_weight_grad,
)
from pnnh_kernels.triton_kernels.bn_stats import bn_backward_finalize, bn_finalize
from pnnh_kernels.triton_kernels.bn_tiles import GradPrologue
from pnnh_kernels.triton_kernels.conv_implicit_gemm import pack_weight, unpack_weight
from pnnh_kernels.triton_kernels.moments import moments_to_sums

pytestmark = requires_a_device


def tolerance(device):
    return kernel_tolerance(exact_dtype(device))


def rows(t):
    """NCHW -> [N*H*W, C], the kernels' output layout."""
    return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])


# --------------------------------------------------------------------------- kernels

CONV_GEOMETRIES = [(3, 1, 1), (1, 1, 0), (3, 2, 1), (1, 2, 0), (3, 1, 0), (3, 2, 0)]  # (kernel, stride, padding)
CONV_SHAPES = [(2, 5, 7, 6), (1, 3, 13, 1), (2, 17, 1, 1)]


@pytest.mark.parametrize("shape", CONV_SHAPES, ids=["7x6", "13x1", "1x1_17ch"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "sliced"])
def test_implicit_gemm_conv_and_its_gradients_match_torch(device, shape, layout):
    dtype = exact_dtype(device)
    n, c, h, w = shape
    base = torch.randn(n, 2 * c, h, w + 1, dtype=dtype, device=device)
    x = base[:, ::2, :, 1:] if layout == "sliced" else base[:, :c, :, :w].contiguous()
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    for k, stride, pad in CONV_GEOMETRIES:
        if h + 2 * pad < k or w + 2 * pad < k:
            continue
        weight = torch.randn(6, c, k, k, dtype=dtype, device=device, requires_grad=True)
        xr = x.detach().clone().requires_grad_()
        ref = F.conv2d(xr, weight, stride=stride, padding=pad)
        out, sums = conv2d_implicit_gemm(x, pack_weight(weight.detach()), k, stride, pad, stats=True)
        close = tolerance(device)
        torch.testing.assert_close(out, rows(ref.detach()), **close, msg=lambda m: f"k{k} s{stride} p{pad}: {m}")
        torch.testing.assert_close(sums[0], rows(ref.detach()).sum(0).double(), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(sums[1], rows(ref.detach()).pow(2).sum(0).double(), rtol=1e-4, atol=1e-4)
        dy = torch.randn_like(ref)
        ref.backward(dy)
        dw = conv2d_weight_grad(x, rows(dy).contiguous(), k, stride, pad)
        torch.testing.assert_close(
            unpack_weight(dw, k), weight.grad, **close, msg=lambda m: f"dW k{k} s{stride} p{pad}: {m}"
        )
        if (
            stride == 1 and pad == k // 2
        ):  # the block's input gradient: a conv reading the packed weight flipped, transposed
            dy_cl = dy.contiguous(memory_format=torch.channels_last)
            dx, _ = conv2d_implicit_gemm(dy_cl, pack_weight(weight.detach()), k, 1, pad, transposed_weight=True)
            torch.testing.assert_close(dx, rows(xr.grad), **close)


@pytest.mark.parametrize("channels", [5, 19])
def test_bn_finalize_matches_the_statistics_of_the_conv_output(device, channels):
    """One launch from the epilogue's per-tile partials to mean, invstd, unbiased var, scale and shift."""
    dtype = exact_dtype(device)
    x = torch.randn(3, 4, 7, 6, dtype=dtype, device=device) + 2.0
    weight = torch.randn(channels, 4, 3, 3, dtype=dtype, device=device)
    out, part = conv2d_implicit_gemm(x, pack_weight(weight), 3, 1, 1, stats=True, reduce_stats=False)
    gamma = 0.5 + torch.rand(channels, dtype=dtype, device=device)
    beta = torch.randn(channels, dtype=dtype, device=device)
    mean, invstd, var, scale, shift = bn_finalize(part, 1e-5, gamma, beta)
    ref = out.double()
    rtol, atol = (1e-10, 1e-10) if dtype == torch.float64 else (1e-5, 1e-5)
    close = dict(rtol=rtol, atol=atol)
    expect_inv = torch.rsqrt(ref.var(0, unbiased=False) + 1e-5)
    torch.testing.assert_close(mean.double(), ref.mean(0), **close)
    torch.testing.assert_close(invstd.double(), expect_inv, **close)
    torch.testing.assert_close(var.double(), ref.var(0, unbiased=True), **close)
    torch.testing.assert_close(scale.double(), gamma.double() * expect_inv, **close)
    torch.testing.assert_close(shift.double(), beta.double() - ref.mean(0) * gamma.double() * expect_inv, **close)


def test_statistics_partials_past_the_launched_tiles_read_as_zero(device, monkeypatch):
    """The partials are sized for the smallest BLOCK_M an autotuner may pick; a launch with larger tiles
    zeroes the rows it does not own instead of a memset. Forced here: rows for 8-row tiles, NaN-filled."""
    from pnnh_kernels.triton_kernels import conv_implicit_gemm as gemm

    monkeypatch.setattr(gemm, "_min_block_m", lambda: 8)
    monkeypatch.setattr(
        gemm,
        "_partials",
        lambda rows, cout, like, acc: torch.full((rows, 4, cout), float("nan"), dtype=acc, device=like.device),
    )
    dtype = exact_dtype(device)
    x = torch.randn(2, 3, 9, 7, dtype=dtype, device=device)
    weight = torch.randn(5, 3, 3, 3, dtype=dtype, device=device)
    out, part = gemm.conv2d_implicit_gemm(x, pack_weight(weight), 3, 1, 1, stats=True, reduce_stats=False)
    assert part.shape[0] == triton.cdiv(out.shape[0], 8) and part.shape[0] > triton.cdiv(
        out.shape[0], gemm._conv_fwd_kernel.configs[0].kwargs["BLOCK_M"]
    )
    sums = moments_to_sums(part)
    torch.testing.assert_close(sums[0], out.sum(0).double(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sums[1], out.double().pow(2).sum(0), rtol=1e-5, atol=1e-5)


def test_bn_finalize_in_eval_reads_the_running_statistics_and_split_affine_halves(device):
    """Eval mode from the running statistics, gamma / beta as the coder's and learner's own tensors,
    written into views of the block's statistics vectors."""
    dtype = exact_dtype(device)
    c, split = 11, 4
    run_mean = torch.randn(c, dtype=dtype, device=device)
    run_var = torch.rand(c, dtype=dtype, device=device) + 0.1
    gamma, beta = torch.randn(c, dtype=dtype, device=device), torch.randn(c, dtype=dtype, device=device)
    block_vectors = [torch.full((c + 3,), float("nan"), dtype=dtype, device=device) for _ in range(3)]
    _mean, _invstd, _var, scale, shift = bn_finalize(
        None,
        1e-3,
        (gamma[:split].clone(), gamma[split:].clone()),
        (beta[:split].clone(), beta[split:].clone()),
        running=(run_mean, run_var),
        out=tuple(t[3:] for t in block_vectors),
    )
    expect_inv = torch.rsqrt(run_var.double() + 1e-3)
    rtol, atol = (1e-12, 1e-12) if dtype == torch.float64 else (1e-6, 1e-6)
    close = dict(rtol=rtol, atol=atol)
    torch.testing.assert_close(block_vectors[0][3:], run_mean, **close)
    torch.testing.assert_close(block_vectors[1][3:].double(), expect_inv, **close)
    torch.testing.assert_close(block_vectors[2][3:], run_var, **close)
    assert all(t[:3].isnan().all() for t in block_vectors)  # only the given views written
    torch.testing.assert_close(scale.double(), gamma.double() * expect_inv, **close)
    torch.testing.assert_close(shift.double(), beta.double() - run_mean.double() * gamma.double() * expect_inv, **close)


@pytest.mark.parametrize(
    "coder_kernel, learner_kernel, tied", [(1, 3, True), (3, 3, False), (3, 1, False), (1, 1, True)]
)
def test_block_weights_pack_and_their_gradients_unpack_like_torch(device, coder_kernel, learner_kernel, tied):
    """One gather packs [W_e; W_1] and [g * W_d, W_2] (kernels padded to the shared size, the tied decoder
    transposed and flipped); one launch maps packed gradients back, the tied decoder's share added."""
    from pnnh_kernels.block import BlockWeights, decoder_conv_weight, pad_kernel
    from pnnh_kernels.triton_kernels.block_weights import pack_block_weights, unpack_block_weight_grads

    dtype = exact_dtype(device)
    cin, cc, hid, gain = 5, 3, 7, 0.37
    K = max(coder_kernel, learner_kernel)
    new = lambda *shape: torch.randn(*shape, dtype=dtype, device=device, requires_grad=True)
    enc, learn1, learn2 = (
        new(cc, cin, coder_kernel, coder_kernel),
        new(hid, cin, learner_kernel, learner_kernel),
        new(cin, hid, learner_kernel, learner_kernel),
    )
    dec = None if tied else new(cin, cc, coder_kernel, coder_kernel)
    w1 = torch.cat([pad_kernel(enc, K), pad_kernel(learn1, K)])
    w2 = torch.cat(
        [pad_kernel(decoder_conv_weight(BlockWeights(enc, learn1, learn2, dec)), K) * gain, pad_kernel(learn2, K)],
        dim=1,
    )
    flat, p1, p2 = pack_block_weights(
        enc.detach(), learn1.detach(), learn2.detach(), None if tied else dec.detach(), gain
    )
    close = tolerance(device)
    torch.testing.assert_close(p1, pack_weight(w1.detach()), **close)
    torch.testing.assert_close(p2, pack_weight(w2.detach()), **close)
    assert flat.numel() == p1.numel() + p2.numel()

    dw1, dw2 = torch.randn_like(w1), torch.randn_like(w2)
    params = [t for t in (enc, learn1, learn2, dec) if t is not None]
    expected = torch.autograd.grad((w1 * dw1).sum() + (w2 * dw2).sum(), params)
    got = unpack_block_weight_grads(pack_weight(dw1), pack_weight(dw2), enc, learn1, learn2, dec, gain)
    for name, g, e in zip(("enc", "learn1", "learn2", "dec"), got, expected):
        torch.testing.assert_close(g, e, **close, msg=lambda m: f"d_{name}: {m}")
    assert tied == (got[3].numel() == 0)


def _bn_act_reference(x, scale, shift, lo, hi, slope, act_scale):
    v = x * scale[None, :, None, None] + shift[None, :, None, None]
    act = act_scale * F.leaky_relu(v, slope)
    channel = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    return torch.where((channel >= lo) & (channel < hi), act, v)


def test_prologue_applies_bn_and_activation_before_zero_padding(device):
    dtype = exact_dtype(device)
    x = torch.randn(2, 7, 5, 6, dtype=dtype, device=device, requires_grad=True)
    scale = torch.rand(7, dtype=dtype, device=device) + 0.5
    shift = torch.randn(7, dtype=dtype, device=device)
    weight = torch.randn(4, 7, 3, 3, dtype=dtype, device=device)
    prologue = Prologue(scale, shift, 2, 6, 0.1, 1.7)  # activation on channels 2..5 only
    h = _bn_act_reference(x, scale, shift, 2, 6, 0.1, 1.7)
    ref = F.conv2d(h, weight, padding=1)
    out, _ = conv2d_implicit_gemm(x.detach(), pack_weight(weight), 3, 1, 1, prologue=prologue)
    close = tolerance(device)
    torch.testing.assert_close(out, rows(ref.detach()), **close)
    dy = torch.randn_like(ref)
    (dw_ref,) = torch.autograd.grad(F.conv2d(h.detach(), weight.requires_grad_(), padding=1), weight, dy)
    dw = conv2d_weight_grad(x.detach(), rows(dy).contiguous(), 3, 1, 1, prologue=prologue)
    torch.testing.assert_close(unpack_weight(dw, 3), dw_ref, **close)


def test_centre_only_ranges_skip_exactly_the_zero_taps(device):
    """A 1x1 kernel padded to 3x3 inside one GEMM: skipping its 8 zero taps changes nothing."""
    dtype = exact_dtype(device)
    x = torch.randn(2, 9, 6, 5, dtype=dtype, device=device)
    w = torch.randn(10, 9, 3, 3, dtype=dtype, device=device)
    w[:4, :, :, :] = 0  # output channels 0..3: a 1x1 kernel
    w[:4, :, 1, 1] = torch.randn(4, 9, dtype=dtype, device=device)
    w[:, 6:, :, :] *= torch.tensor(
        [[0, 0, 0], [0, 1, 0], [0, 0, 0]], dtype=dtype, device=device
    )  # input channels 6..8: 1x1
    ref = rows(F.conv2d(x, w, padding=1))
    close = tolerance(device)
    out, _ = conv2d_implicit_gemm(x, pack_weight(w), 3, 1, 1, centre_range=(0, 4))
    torch.testing.assert_close(out, ref, **close)
    out, _ = conv2d_implicit_gemm(x, pack_weight(w), 3, 1, 1, skip_range=(6, 9))
    torch.testing.assert_close(out, ref, **close)


@pytest.mark.parametrize("training", [True, False])
def test_row_passes_match_autograd_of_bn_and_activation(device, training):
    """The forward pass and the backward's reduction (its apply: the grad-prologue tests below)."""
    dtype = exact_dtype(device)
    m, c, lo, hi, slope, act_scale = 37, 19, 3, 17, 0.2, 1.3
    z = torch.randn(m, c, dtype=dtype, device=device, requires_grad=True)
    gamma = torch.rand(c, dtype=dtype, device=device) + 0.5
    beta = torch.randn(c, dtype=dtype, device=device)
    if training:
        mean, var = z.mean(0), z.var(0, unbiased=False)
    else:
        mean, var = z.detach().mean(0) + 0.1, z.detach().var(0) + 0.2
    invstd = torch.rsqrt(var + 1e-5)
    xhat = (z - mean) * invstd
    channel = torch.arange(c, device=device)
    v = xhat * gamma + beta
    y = torch.where((channel >= lo) & (channel < hi), act_scale * F.leaky_relu(v, slope), v)
    dy = torch.randn_like(y)

    scale = gamma * invstd.detach()
    out = bn_act_forward(z.detach(), scale, beta - mean.detach() * scale, (lo, hi), slope, act_scale)
    close = tolerance(device)
    torch.testing.assert_close(out, y.detach(), **close)
    # the same pass writing an NCHW map (the block's output for NCHW input): rows are (n, h, w) pixels
    as_map = lambda t: t.view(1, m, 1, c).permute(0, 3, 1, 2)
    for fmt in (torch.contiguous_format, torch.channels_last):
        out_map = torch.empty((1, c, m, 1), dtype=dtype, device=device, memory_format=fmt)
        bn_act_forward(z.detach(), scale, beta - mean.detach() * scale, (lo, hi), slope, act_scale, out=out_map)
        torch.testing.assert_close(out_map, as_map(y.detach()), **close)
    stats = (mean.detach(), invstd.detach(), gamma, beta)
    sums = bn_act_backward_sums(dy, z.detach(), *stats, (lo, hi), slope, act_scale)
    # slopes as tensors of the data's dtype: Python scalars in torch.where would round them to float32
    slopes = act_scale * torch.where(v > 0, torch.ones_like(v), torch.full_like(v, slope))
    g = dy * torch.where((channel >= lo) & (channel < hi), slopes, torch.ones_like(v))
    torch.testing.assert_close(sums[0], g.sum(0).detach().double(), **close)  # = d(beta)
    torch.testing.assert_close(sums[1], (g * xhat).sum(0).detach().double(), **close)  # = d(gamma)


def _bn_act_layer(m, c, lo, hi, slope, act_scale, training, device, dtype):
    """A pre-norm z [m, c] (requires grad) and y = act(BN(z)) on channels [lo, hi), with the statistics."""
    z = (torch.randn(m, c, dtype=dtype, device=device) * 2 + 0.5).requires_grad_()
    gamma = (torch.rand(c, dtype=dtype, device=device) + 0.5).requires_grad_()
    beta = torch.randn(c, dtype=dtype, device=device, requires_grad=True)
    if training:
        mean, var = z.mean(0), z.var(0, unbiased=False)
    else:
        mean, var = z.detach().mean(0) + 0.1, z.detach().var(0) + 0.2
    invstd = torch.rsqrt(var + 1e-5)
    v = (z - mean) * invstd * gamma + beta
    channel = torch.arange(c, device=device)
    y = torch.where((channel >= lo) & (channel < hi), act_scale * F.leaky_relu(v, slope), v)
    return z, y, (mean.detach(), invstd.detach(), gamma, beta)  # gamma and beta require grad


@pytest.mark.parametrize("training", [True, False])
def test_grad_prologue_applies_dbn_and_dact_inside_both_backward_convolutions(device, training):
    """The input and weight gradients of conv(act(BN(z))) from dy with dAct + dBN applied as the
    convolutions load it: the gradient of z is never stored. Odd widths (19 channels: not a multiple of
    any tile), activation on a channel range only."""
    dtype = exact_dtype(device)
    n, h, w, c, lo, hi, slope, act_scale = 2, 5, 4, 19, 3, 17, 0.2, 1.3
    z, y, (mean, invstd, gamma_p, beta_p) = _bn_act_layer(
        n * h * w, c, lo, hi, slope, act_scale, training, device, dtype
    )
    weight = torch.randn(6, c, 3, 3, dtype=dtype, device=device)
    dy = torch.randn_like(y)
    dz_ref, dgamma_ref, dbeta_ref = torch.autograd.grad(y, (z, gamma_p, beta_p), dy)
    gamma, beta = gamma_p.detach(), beta_p.detach()
    # the affine parameters as two halves (the coder's and the learner's tensors), split at channel 7
    halves = lambda t: (t[:7].clone(), t[7:].clone())

    sums_part = bn_act_backward_sums(
        dy, z.detach(), mean, invstd, halves(gamma), halves(beta), (lo, hi), slope, act_scale, reduce=False
    )
    coef, grads = bn_backward_finalize(sums_part, n * h * w, mean, invstd, halves(gamma), halves(beta), training)
    close = tolerance(device)
    dg_lo, db_lo, dg_hi, db_hi = grads
    torch.testing.assert_close(torch.cat([dg_lo, dg_hi]), dgamma_ref, **close)
    torch.testing.assert_close(torch.cat([db_lo, db_hi]), dbeta_ref, **close)
    scale = gamma * invstd
    torch.testing.assert_close(coef[0], scale, **close)  # the forward's scale and shift: rows 0 and 4
    torch.testing.assert_close(coef[4], beta - mean * scale, **close)
    grad_prologue = GradPrologue(z.detach(), coef[0], coef[4], coef[:4], lo, hi, slope, act_scale)
    nchw = lambda t: t.view(n, h, w, -1).permute(0, 3, 1, 2)

    # dz itself, through a 1x1 identity convolution
    eye = torch.eye(c, dtype=dtype, device=device)[:, :, None, None]
    dz, _ = conv2d_implicit_gemm(
        nchw(dy), pack_weight(eye), 1, 1, 0, prologue=grad_prologue._replace(saved=nchw(z.detach()))
    )
    torch.testing.assert_close(dz, dz_ref, **close)

    # the input gradient of a conv whose output is z (6 -> c channels): the transposed conv of dz
    dx_ref = F.conv_transpose2d(nchw(dz_ref), weight.transpose(0, 1), padding=1)
    dx, _ = conv2d_implicit_gemm(
        nchw(dy),
        pack_weight(weight.transpose(0, 1)),
        3,
        1,
        1,
        transposed_weight=True,
        prologue=grad_prologue._replace(saved=nchw(z.detach())),
    )
    torch.testing.assert_close(dx, rows(dx_ref), **close)

    # the weight gradient of a conv x -> z, taking dz from dy through the same prologue
    x = torch.randn(n, 7, h, w, dtype=dtype, device=device)
    dw_ref = torch.nn.grad.conv2d_weight(x, (c, 7, 3, 3), nchw(dz_ref), padding=1)
    dw = conv2d_weight_grad(x, dy, 3, 1, 1, dy_prologue=grad_prologue)
    torch.testing.assert_close(unpack_weight(dw, 3), dw_ref, **close)


def test_grad_prologue_refuses_a_saved_tensor_of_another_layout(device):
    dtype = exact_dtype(device)
    dy = torch.randn(12, 4, dtype=dtype, device=device)
    vec = torch.ones(4, dtype=dtype, device=device)
    bad = GradPrologue(
        torch.randn(4, 12, dtype=dtype, device=device).t(),
        vec,
        vec,
        torch.ones(4, 4, dtype=dtype, device=device),
        0,
        4,
        0.0,
        1.0,
    )
    with pytest.raises(ValueError, match="strides"):
        conv2d_weight_grad(torch.randn(3, 2, 2, 2, dtype=dtype, device=device), dy, 1, 1, 0, dy_prologue=bad)


@triton.jit
def _store_cast_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=mask).to(y_ptr.dtype.element_ty), mask=mask)


def test_how_this_triton_rounds_float32_to_bfloat16(device):
    """Compiled Triton rounds to nearest even, as torch does; the interpreter truncates toward zero. The
    bf16 autocast error bound in test_triton_conv.py relies on this: when this test fails on the CPU,
    the interpreter rounds correctly and that bound can be the strict one there too."""
    x = torch.randn(4096, device=device) * 10
    y = torch.empty(4096, device=device, dtype=torch.bfloat16)
    _store_cast_kernel[(4,)](x, y, 4096, BLOCK=1024)
    nearest = x.to(torch.bfloat16)
    if device == "cpu":
        toward_zero = (x.view(torch.int32) & ~0xFFFF).view(torch.float32).to(torch.bfloat16)
        assert torch.equal(y, toward_zero) and not torch.equal(y, nearest)
    else:
        assert torch.equal(y, nearest)


def test_chosen_tiles_persist_on_a_gpu_and_not_in_the_interpreter(monkeypatch):
    import inspect

    import triton

    from pnnh_kernels.triton_kernels import tuning

    monkeypatch.setattr(tuning, "interpreting", lambda: True)
    assert tuning.persistent_tuning() == {}  # the interpreter tunes nothing
    monkeypatch.setattr(tuning, "interpreting", lambda: False)
    expected = {"cache_results": True} if "cache_results" in inspect.signature(triton.autotune).parameters else {}
    assert tuning.persistent_tuning() == expected
