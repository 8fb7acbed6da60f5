"""The 'cuda' backend (the extension's CUDA kernels around cuDNN / cuBLAS) against the reference.

The block tests run where torch has CUDA and a GPU is present, and skip elsewhere; the refusal tests run
everywhere. (test_cuda_sources.py compiles every kernel with nvcc wherever nvcc exists.)
"""

import pytest
import torch
from helpers import (
    BLOCK_CASES,
    assert_matches_reference,
    gpu_exact_math,
    low_precision_errors,
    op_args,
    randomize_norms,
    twin,
)

import pnnh_kernels as pk
from pnnh_kernels.backends.registry import BackendUnavailableError, registered_backends, select_backend


def _cuda_ready() -> bool:
    return torch.cuda.is_available() and registered_backends()["cuda"].unavailable_reason() is None


gpu = pytest.mark.skipif(not _cuda_ready(), reason="needs a CUDA device and the extension built with CUDA")


@pytest.fixture
def exact():
    gpu_exact_math()


@gpu
@pytest.mark.parametrize("case", sorted(BLOCK_CASES))
@pytest.mark.parametrize("training", [True, False])
def test_cuda_block_matches_reference(exact, case, training):
    ref = pk.PNNHConv2d(5, backend="reference", **BLOCK_CASES[case]).to(device="cuda").train(training)
    randomize_norms(ref)
    x = torch.randn(3, 5, 7, 6, device="cuda")
    assert_matches_reference(ref, twin(ref, "cuda"), x)


@gpu
@pytest.mark.parametrize(
    "shape", [(1, 6, 7, 7), (2, 6, 1, 1), (1, 6, 13, 1), (2, 6, 2, 13)], ids=["batch1", "1x1", "column", "row"]
)
def test_cuda_block_odd_shapes(exact, shape):
    ref = pk.PNNHConv2d(6, backend="reference").cuda()
    assert_matches_reference(ref, twin(ref, "cuda"), torch.randn(shape, device="cuda"))


@gpu
def test_cuda_block_channels_last_and_strided_input(exact):
    ref = pk.PNNHConv2d(6, backend="reference").cuda()
    randomize_norms(ref)
    fused = twin(ref, "cuda")
    strided = torch.randn(2, 12, 9, 10, device="cuda")[:, ::2, :, 1:]
    channels_last = torch.randn(2, 6, 9, 9, device="cuda").to(memory_format=torch.channels_last)
    for x in (strided, channels_last):
        assert_matches_reference(ref, fused, x)
    assert fused(channels_last).is_contiguous(memory_format=torch.channels_last)


@gpu
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_statistics_passes_match_torch(layout, dtype):
    """channel_sums' per-split partials and bn_finalize's statistics, written at a column offset, for an
    NCHW [N, C, H*W] and a channels_last [N*H*W, C, 1] map (a wide one: several 32-channel blocks)."""
    from pnnh_kernels._extension import extension

    z = (1.5 + torch.randn(5, 70, 13, 11, device="cuda")).to(dtype)
    if layout == "channels_last":
        z3 = z.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1).reshape(-1, 70, 1)
    else:
        z3 = z.reshape(5, 70, -1)
    sums = extension().channel_sums(z3, 3, 40)
    stats = torch.full((3, 50), -1.0, device="cuda")
    extension().bn_finalize(sums, float(5 * 13 * 11), 1e-5, stats, 6)
    part = z[:, 3:43].double().transpose(0, 1).reshape(40, -1)
    torch.testing.assert_close(stats[0, 6:46].double(), part.mean(1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stats[2, 6:46].double(), part.var(1), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(
        stats[1, 6:46].double(), torch.rsqrt(part.var(1, unbiased=False) + 1e-5), rtol=1e-4, atol=1e-5
    )
    assert (stats[:, :6] == -1).all() and (stats[:, 46:] == -1).all()


@gpu
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_cuda_bn_input_grad_matches_torch(layout):
    """dz = coef_dy * d_act + coef_z * z + bias per channel, z read at a channel offset of a wider map."""
    from pnnh_kernels._extension import extension

    def flat(t):
        c = t.shape[1]
        if layout == "channels_last":
            return t.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1).reshape(-1, c, 1)
        return t.reshape(t.shape[0], c, -1)

    z, d_act = torch.randn(4, 50, 9, 7, device="cuda"), torch.randn(4, 37, 9, 7, device="cuda")
    coef = [torch.randn(37, device="cuda") for _ in range(3)]
    dz = torch.empty_like(flat(d_act))
    extension().bn_input_grad(flat(d_act), flat(z), 5, dz, *coef)
    view = (1, -1, 1, 1)
    expected = coef[0].view(view) * d_act + coef[1].view(view) * z[:, 5:42] + coef[2].view(view)
    torch.testing.assert_close(dz, flat(expected), rtol=1e-5, atol=1e-5)


@gpu
@pytest.mark.parametrize("options", [dict(), dict(coder_kernel_size=3), dict(tied=False, out_channels=33)])
def test_cuda_block_channels_last_wide(exact, options):
    """channels_last maps take the channel-contiguous reductions: several 32-channel blocks, a partial
    last one, the learner half at a channel offset, more rows than one block's split."""
    ref = pk.PNNHConv2d(40, hidden_channels=45, backend="reference", **options).cuda()
    randomize_norms(ref)
    fused = twin(ref, "cuda")
    x = torch.randn(3, 40, 23, 21, device="cuda").to(memory_format=torch.channels_last)
    assert_matches_reference(ref, fused, x)
    assert fused(x).is_contiguous(memory_format=torch.channels_last)


@gpu
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("autocast", [False, True], ids=["pure", "autocast"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_low_precision_error_within_twice_eager(dtype, autocast, layout):
    # pure: the module in dtype; autocast: float32 parameters under torch.autocast (convolutions in dtype,
    # statistics and parameter gradients float32), each against eager computed the same way
    ref64 = pk.PNNHConv2d(16, backend="reference").to(device="cuda", dtype=torch.float64)
    randomize_norms(ref64)
    x64 = torch.randn(2, 16, 8, 8, dtype=torch.float64, device="cuda").contiguous(memory_format=layout)
    errors = low_precision_errors(ref64, "cuda", x64, dtype, autocast=autocast)
    assert errors["cuda"] <= 2 * errors["eager"] + 1e-3, errors


@gpu
def test_cuda_custom_op_passes_opcheck():
    from pnnh_kernels.backends.cuda.conv import conv_block as cuda_conv_block

    block = pk.PNNHConv2d(4).cuda()
    x = torch.randn(2, 4, 5, 5, device="cuda", requires_grad=True)
    torch.library.opcheck(cuda_conv_block.op, op_args(block, x))


def test_cuda_backend_refuses_cpu_tensors_and_linear_with_a_reason():
    block = pk.PNNHConv2d(4)
    with pytest.raises(BackendUnavailableError, match=r"backend 'cuda' cannot compute this conv2d call: .*(CUDA|cuda)"):
        select_backend("cuda", "conv2d", torch.randn(1, 4, 3, 3), block.block_weights(), block.config)
    lin = pk.PNNHLinear(4)
    with pytest.raises(BackendUnavailableError, match=r"backend 'cuda' cannot compute this linear call"):
        select_backend("cuda", "linear", torch.randn(2, 4), lin.block_weights(), lin.config)
    # whatever the build, the linear refusal itself names what runs PNNHLinear instead
    reason = registered_backends()["cuda"].unsupported_reason(
        "linear", torch.randn(2, 4), lin.block_weights(), lin.config
    )
    assert reason is not None and "PNNHConv2d only" in reason and "'triton' or 'eager'" in reason


@pytest.mark.skipif(torch.version.cuda is not None, reason="checks the CPU-only build")
def test_cpu_only_build_says_it_has_no_cuda():
    from pnnh_kernels._extension import extension

    if extension() is None:
        pytest.skip("extension not built")
    assert extension().with_cuda is False
    assert "without CUDA" in (registered_backends()["cuda"].unavailable_reason() or "")
