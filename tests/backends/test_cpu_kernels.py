"""The C++ passes one by one (csrc/cpu): the rows batch-norm passes against torch, bad arguments refused,
the thread pool; and the test-only CPU versions of the 'cuda' passes (tests/cuda_passes_cpu/)."""

import pytest
import torch
from accuracy import assert_float32_close
from cuda_passes_on_cpu import cuda_passes_on_cpu

from pnnh_kernels._extension import extension, extension_error

pytestmark = pytest.mark.skipif(extension_error() is not None, reason=f"C++ extension unavailable: {extension_error()}")

ROW_CASES = [(131, 16, 0, 16), (300, 48, 0, 48), (257, 24, 5, 11), (7, 3, 2, 1), (1, 8, 0, 8)]


def test_extension_runs_its_passes_on_torchs_thread_pool():
    # built without OpenMP, ATen's header-only parallel_for silently runs every pass on one thread
    assert extension().with_openmp


def test_cuda_passes_on_cpu_reject_bad_arguments():
    C = cuda_passes_on_cpu()
    z = torch.randn(2, 4, 5)
    with pytest.raises(RuntimeError, match="channel range out of bounds"):
        C.channel_sums(z, 2, 4)
    with pytest.raises(RuntimeError, match="contiguous"):
        C.channel_sums(z.transpose(0, 2), 0, 1)
    with pytest.raises(RuntimeError, match="data's dtype"):
        C.bn_act_apply(
            z,
            0,
            torch.empty(2, 4, 5),
            torch.zeros(4, dtype=torch.float64),
            torch.ones(4),
            torch.ones(4),
            torch.zeros(4),
            True,
            0.0,
            1.0,
        )


def _norm_params(cn, dtype=torch.float64):
    g = torch.Generator().manual_seed(cn)
    mean, invstd = torch.randn(cn, generator=g, dtype=dtype), 0.5 + torch.rand(cn, generator=g, dtype=dtype)
    gamma, beta = 0.5 + torch.rand(cn, generator=g, dtype=dtype), torch.randn(cn, generator=g, dtype=dtype)
    return mean, invstd, gamma, beta


@pytest.mark.parametrize("rows, width, c0, cn", ROW_CASES)
def test_rows_kernels_match_torch(rows, width, c0, cn):
    C = extension()
    z = torch.randn(rows, width, dtype=torch.float64)
    dy = torch.randn(rows, cn, dtype=torch.float64)
    mean, invstd, gamma, beta = _norm_params(cn)
    col = z[:, c0 : c0 + cn]
    sums = C.rows_channel_sums(z, c0, cn)
    torch.testing.assert_close(sums, torch.stack([col.sum(0), col.pow(2).sum(0)]))

    slope, scale = 0.2, 1.3
    act = lambda t: scale * torch.where(t > 0, t, slope * t)
    out = torch.full((rows, cn + 2), 7.0, dtype=torch.float64)
    C.rows_bn_act_apply(z, c0, out, 1, mean, invstd, gamma, beta, True, slope, scale)
    xhat = (col - mean) * invstd
    torch.testing.assert_close(out[:, 1 : 1 + cn], act(xhat * gamma + beta))
    assert (out[:, 0] == 7).all() and (out[:, -1] == 7).all()  # nothing written outside the range

    for training in (True, False):
        zz = col.detach().clone().requires_grad_()
        if training:  # batch statistics: the gradient flows through mean and invstd too
            m, v = zz.mean(0), zz.var(0, unbiased=False)
            y = act((zz - m) * torch.rsqrt(v + 1e-5) * gamma + beta)
            b_mean, b_inv = m.detach(), torch.rsqrt(v.detach() + 1e-5)
        else:
            y = act((zz - mean) * invstd * gamma + beta)
            b_mean, b_inv = mean, invstd
        (expected,) = torch.autograd.grad(y, zz, dy)
        sums_g = C.rows_bn_act_backward_sums(dy, z, c0, b_mean, b_inv, gamma, beta, True, slope, scale)
        dz = torch.zeros_like(z)
        C.rows_bn_act_backward_apply(dy, z, c0, dz, b_mean, b_inv, gamma, beta, sums_g, training, True, slope, scale)
        torch.testing.assert_close(dz[:, c0 : c0 + cn], expected)
        assert dz[:, :c0].abs().sum() == 0 and dz[:, c0 + cn :].abs().sum() == 0


def test_rows_kernels_reject_bad_arguments():
    C = extension()
    z = torch.randn(6, 4)
    params = _norm_params(3, torch.float32)
    with pytest.raises(RuntimeError, match="out of bounds"):
        C.rows_channel_sums(z, 2, 3)
    with pytest.raises(RuntimeError, match="contiguous"):
        C.rows_channel_sums(z.t(), 0, 1)
    with pytest.raises(RuntimeError, match="contiguous"):
        C.rows_channel_sums(torch.randn(2, 3, 4), 0, 1)
    with pytest.raises(RuntimeError, match="data's dtype"):
        C.rows_bn_act_apply(z, 0, torch.empty(6, 3), 0, *_norm_params(3), True, 0.0, 1.0)
    with pytest.raises(RuntimeError, match="row counts differ"):
        C.rows_bn_act_apply(z, 0, torch.empty(5, 3), 0, *params, True, 0.0, 1.0)
    with pytest.raises(RuntimeError, match="must have the range's"):
        C.rows_bn_act_backward_sums(torch.randn(6, 4), z, 0, *params, True, 0.0, 1.0)
    with pytest.raises(RuntimeError, match="float64"):
        C.rows_bn_act_backward_apply(
            torch.randn(6, 3), z, 0, torch.empty_like(z), *params, torch.zeros(2, 3), True, True, 0.0, 1.0
        )


def test_cuda_passes_channel_sums_match_torch():
    z = torch.randn(3, 7, 11, dtype=torch.float64)
    sums = cuda_passes_on_cpu().channel_sums(z, 2, 4)
    torch.testing.assert_close(sums[0], z[:, 2:6].sum((0, 2)))
    torch.testing.assert_close(sums[1], z[:, 2:6].pow(2).sum((0, 2)))


@pytest.mark.parametrize("splits", [1, 3])
def test_cuda_passes_bn_finalize_writes_the_statistics_at_the_column_offset(splits):
    z = 2.0 + torch.randn(3, 7, 11, dtype=torch.float64)
    sums = cuda_passes_on_cpu().channel_sums(z, 2, 4)
    if splits > 1:  # [splits, 2, cn] partials add up
        sums = torch.stack([sums / 2, sums / 4, sums / 4])
    stats = torch.full((3, 9), -1.0, dtype=torch.float64)
    cuda_passes_on_cpu().bn_finalize(sums, 33.0, 1e-5, stats, 3)
    part = z[:, 2:6].transpose(0, 1).reshape(4, -1)
    torch.testing.assert_close(stats[0, 3:7], part.mean(1))
    torch.testing.assert_close(stats[1, 3:7], torch.rsqrt(part.var(1, unbiased=False) + 1e-5))
    torch.testing.assert_close(stats[2, 3:7], part.var(1, unbiased=True))
    assert (stats[:, :3] == -1).all() and (stats[:, 7:] == -1).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rows_batch_stats_match_torch(dtype):
    z = (1.5 + torch.randn(301, 9, dtype=torch.float64)).to(dtype)
    mean, invstd, var = extension().rows_batch_stats(z, 2, 5, 1e-5)
    assert mean.dtype == invstd.dtype == var.dtype == dtype
    exact = _column_stats(z[:, 2:7].double())
    plain = _column_stats(z[:, 2:7])  # float32: the bound is plain PyTorch's own float32 error (accuracy.py)
    for name, actual in zip(("mean", "var", "invstd"), (mean, var, invstd)):
        if dtype == torch.float64:
            torch.testing.assert_close(actual, exact[name], rtol=1e-12, atol=1e-12)
        else:
            assert_float32_close(actual, exact[name], plain[name], name)


def _column_stats(cols: torch.Tensor) -> dict[str, torch.Tensor]:
    return {
        "mean": cols.mean(0),
        "var": cols.var(0, unbiased=True),
        "invstd": torch.rsqrt(cols.var(0, unbiased=False) + 1e-5),
    }


def test_the_installed_extension_has_no_cpu_versions_of_the_cuda_passes():
    # they are test scaffolding (tests/cuda_passes_cpu/); built without CUDA, the extension has no 'cuda' passes
    if not extension().with_cuda:
        assert not hasattr(extension(), "channel_sums")
