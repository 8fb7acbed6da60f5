"""The float32 rule of the tests (accuracy.py) passes what is right and fails what is wrong: a gradient
perturbed by far less than the old fixed tolerance allowed, a NaN, a wrong shape, a mathematically zero
gradient given a value."""

import pytest
import torch
from accuracy import FLOOR, assert_float32_agrees, assert_float32_close, float32_violation, relative_error
from helpers import randomize_norms, twin

import pnnh_kernels as pk


def _block() -> tuple[pk.PNNHConv2d, torch.Tensor]:
    ref = pk.PNNHConv2d(5, backend="reference")
    randomize_norms(ref)
    return ref, torch.randn(3, 5, 7, 6)


def _perturb_gradient(module: torch.nn.Module, name: str, relative: float) -> None:
    """Adds ``relative`` times the gradient's largest magnitude to one element of its gradient."""

    def hook(grad: torch.Tensor) -> torch.Tensor:
        bumped = grad.clone()
        bumped.view(-1)[0] += relative * grad.abs().max()
        return bumped

    dict(module.named_parameters())[name].register_hook(hook)


def test_a_plain_pytorch_twin_passes():
    ref, x = _block()
    assert_float32_agrees(ref, twin(ref, "eager"), x)


@pytest.mark.parametrize("name", ["learner1_weight", "learner_norm.weight", "coder.encoder"])
def test_a_gradient_perturbed_far_inside_the_old_fixed_tolerance_fails(name):
    ref, x = _block()
    wrong = twin(ref, "eager")
    _perturb_gradient(wrong, name, 3e-5)  # the old rule (rtol 1e-4, atol 1e-5) let 1e-4 relative through
    with pytest.raises(AssertionError, match=f"grad {name}"):
        assert_float32_agrees(ref, wrong, x, steps=1)


def test_a_mathematically_zero_gradient_given_a_value_fails():
    """The coder norm's shift gets no gradient under a batch-norm output: float32 leaves noise there (about
    1e-6 beside gradients of about 10), which passes; a value of 1e-4 does not."""
    ref, x = _block()
    assert_float32_agrees(ref, twin(ref, "eager"), x, steps=1)
    wrong = twin(ref, "eager")
    wrong.coder_norm.bias.register_hook(lambda g: g + 1e-4)
    with pytest.raises(AssertionError, match=r"grad coder_norm\.bias"):
        assert_float32_agrees(ref, wrong, x, steps=1)


def test_kernel_level_rule():
    a, b = torch.randn(64, 48), torch.randn(48, 32)
    exact = a.double() @ b.double()
    plain = a @ b
    assert_float32_close(plain.clone(), exact, plain)
    off = plain.clone()
    off[3, 4] += 1e-5 * exact.abs().max().item()
    assert float32_violation(off, exact, plain) is not None
    nan = plain.clone()
    nan[0, 0] = float("nan")
    assert float32_violation(nan, exact, plain) is not None
    assert float32_violation(plain[:, :31], exact, plain) is not None
    assert relative_error(torch.zeros(2), torch.zeros(2, dtype=torch.float64)) == 0.0
    assert FLOOR < 1e-5  # the floor alone is tighter than any perturbation above
