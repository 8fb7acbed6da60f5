"""The 'cpu' op's 1x1 coder from its input's moments (csrc/cpu/rows_coder.cpp) against the coder written
out with its output z_c formed, differentiated by autograd."""

from typing import NamedTuple, Optional

import pytest
import torch
from accuracy import assert_float32_close

from pnnh_kernels._extension import extension, extension_error

pytestmark = pytest.mark.skipif(extension_error() is not None, reason=f"C++ extension unavailable: {extension_error()}")

F64 = torch.float64


class Fold(NamedTuple):
    a: torch.Tensor
    shift: torch.Tensor
    m: torch.Tensor
    through: torch.Tensor
    offset: torch.Tensor


class Grads(NamedTuple):
    encoder: torch.Tensor
    decoder_matrix: torch.Tensor
    gamma: torch.Tensor
    beta: torch.Tensor
    input_self: Optional[torch.Tensor]
    input_const: Optional[torch.Tensor]


def input_moments(x):
    return extension().coder_input_moments(x)


def coder_batch_stats(moments, enc, count):
    return extension().coder_batch_stats(moments, enc, count)


def fold_coder(enc, mat, mean, invstd, gamma, beta, gain):
    return Fold(*extension().coder_fold(enc, mat, mean, invstd, gamma, beta, gain))


def _formed_coder(x, enc, mat, gamma, beta, mean, invstd, gain):
    """gain * BN_c(x We^T) M^T with the given statistics (the part of layer 2's output the coder adds)."""
    zc = x @ enc.t()
    return gain * (((zc - mean) * invstd) * gamma + beta) @ mat.t()


def test_moments_give_the_coder_statistics():
    g = torch.Generator().manual_seed(0)
    x = (2.0 + torch.randn(517, 12, generator=g)).float()  # an offset mean: the Gram matrix must not cancel it away
    enc = torch.randn(7, 12, generator=g).float()
    mean, var = coder_batch_stats(input_moments(x), enc, x.shape[0])
    moments = input_moments(x)
    # judged against float64 with the bound of plain PyTorch's float32 computation of each (accuracy.py)
    exact, plain = _coder_statistics(x.double(), enc.double()), _coder_statistics(x, enc)
    for name, actual in (("mean", mean), ("var", var), ("sum", moments[0]), ("gram", moments[1:])):
        assert_float32_close(actual, exact[name], plain[name], name)


def _coder_statistics(x: torch.Tensor, enc: torch.Tensor) -> dict[str, torch.Tensor]:
    """What the moments give, computed directly: BN_c's batch statistics, the input's sum and Gram matrix."""
    zc = x @ enc.t()
    return {"mean": zc.mean(0), "var": zc.var(0, unbiased=False), "sum": x.sum(0), "gram": x.t() @ x}


@pytest.mark.parametrize("use_batch", [True, False])
@pytest.mark.parametrize("cout", [12, 5])
def test_coder_gradients_match_autograd_on_the_formed_coder(use_batch, cout):
    g = torch.Generator().manual_seed(1)
    rows, cin, cc, gain, eps = 37, 12, 7, 1.5, 1e-5
    x = (0.5 + torch.randn(rows, cin, generator=g, dtype=F64)).requires_grad_()
    enc = torch.randn(cc, cin, generator=g, dtype=F64).requires_grad_()
    mat = torch.randn(cout, cc, generator=g, dtype=F64).requires_grad_()
    gamma = (0.5 + torch.rand(cc, generator=g, dtype=F64)).requires_grad_()
    beta = torch.randn(cc, generator=g, dtype=F64).requires_grad_()
    du = torch.randn(rows, cout, generator=g, dtype=F64)
    if use_batch:  # BN_2's input gradient under batch statistics is centred: the op relies on it
        du = du - du.mean(0)

    moments = input_moments(x.detach())
    if use_batch:
        zc = x @ enc.t()
        mean, var = zc.mean(0), zc.var(0, unbiased=False)
        invstd = torch.rsqrt(var + eps)
    else:
        mean = torch.randn(cc, generator=g, dtype=F64)
        invstd = 0.5 + torch.rand(cc, generator=g, dtype=F64)
    (_formed_coder(x, enc, mat, gamma, beta, mean, invstd, gain) * du).sum().backward()

    m_val, inv_val = mean.detach(), invstd.detach()
    fold = fold_coder(enc.detach(), mat.detach(), m_val, inv_val, gamma.detach(), beta.detach(), gain)
    grads = Grads(
        *extension().coder_backward(
            du.t() @ x.detach(),
            None if use_batch else du.sum(0),
            moments,
            enc.detach(),
            mat.detach(),
            m_val,
            inv_val,
            gamma.detach(),
            beta.detach(),
            use_batch,
            rows,
            gain,
        )
    )
    tol = dict(rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(grads.encoder, enc.grad, **tol)
    torch.testing.assert_close(grads.decoder_matrix, mat.grad, **tol)
    torch.testing.assert_close(grads.gamma, gamma.grad, **tol)
    torch.testing.assert_close(grads.beta, beta.grad, **tol)
    dx = du @ fold.through
    if use_batch:
        dx = dx + x.detach() @ grads.input_self + grads.input_const
    else:
        assert grads.input_self is None and grads.input_const is None
    torch.testing.assert_close(dx, x.grad, **tol)


def test_folded_coder_reproduces_the_decoded_output():
    g = torch.Generator().manual_seed(2)
    x, enc, mat = (torch.randn(*s, generator=g, dtype=F64) for s in ((9, 6), (4, 6), (6, 4)))
    mean, invstd, gamma, beta = (
        torch.randn(4, dtype=F64),
        torch.rand(4, dtype=F64) + 0.5,
        torch.rand(4, dtype=F64),
        torch.randn(4, dtype=F64),
    )
    fold = fold_coder(enc, mat, mean, invstd, gamma, beta, 0.7)
    torch.testing.assert_close(
        x @ fold.through.t() + fold.offset, _formed_coder(x, enc, mat, gamma, beta, mean, invstd, 0.7)
    )
