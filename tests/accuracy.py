"""How the tests judge a float32 result: against a float64 run of the same math, with a bound set by what
plain PyTorch's own float32 computation of the same thing loses on the same data.

A fixed tolerance (say rtol 1e-4, atol 1e-5) tuned on one host fails on another whose vector paths round
differently, and says nothing about how accurate a kernel is. Here each tensor's error is its largest
absolute difference from the float64 result, relative to that result's largest magnitude; a result passes
when its error is at most ``FACTOR`` times the error of the plain PyTorch float32 computation (the
*baseline*) plus ``FLOOR``. A tensor whose exact value cancels below float32's resolution of its terms
(a mathematically zero gradient, such as the coder norm's shift under a batch-norm output) is rounding
noise in any float32 computation: the baseline's relative error is 1 or more there, and the bound is
``NOISE_FACTOR`` times that noise, which still fails a wrong value of the size of the other results.
float64 comparisons keep their fixed, tight tolerances (helpers.TOLERANCES).
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

#: float32's machine epsilon (2^-23)
EPS32 = torch.finfo(torch.float32).eps
#: a fused kernel sums in other orders than PyTorch does: it may lose a few times what PyTorch loses
FACTOR = 4.0
#: relative to the largest magnitude; for tensors that plain PyTorch happens to compute almost exactly
FLOOR = 32 * EPS32
#: results left out past ~1e19: the batch variance exceeds float32's range and the fused ops return it in
#: float32 (inf), so the running variance is inf though 0.1 of the batch's would fit (eager overflows sooner)
RUNNING_VAR_PAST_FLOAT32 = ("running_var",)
#: for tensors below float32's resolution: the largest of a few noise values varies several-fold by seed
NOISE_FACTOR = 32.0


def relative_error(actual: torch.Tensor, exact: torch.Tensor) -> float:
    """Largest |actual - exact| over the tensor, relative to max |exact| (absolute where exact is all zero);
    ``inf`` for a shape mismatch or a non-finite value where the exact result is finite. Where the exact
    value is past float32's range, the float32 result must be the infinity it rounds to."""
    if actual.shape != exact.shape:
        return math.inf
    exact, actual = exact.detach().double().cpu(), actual.detach().double().cpu()
    beyond = exact.abs() > torch.finfo(torch.float32).max  # float32 can only say inf there
    if bool(beyond.any()):
        if not torch.equal(actual[beyond], exact[beyond].float().double()):
            return math.inf
        exact, actual = exact[~beyond], actual[~beyond]
    if exact.numel() == 0:
        return 0.0
    diff = (actual - exact).abs()
    if not bool(torch.isfinite(diff).all()):
        return math.inf
    scale = exact.abs().max().item()
    return diff.max().item() / (scale if scale > 0 else 1.0)


def float32_bound(baseline_error: float) -> float:
    if baseline_error >= 1.0:  # the exact value is below float32's resolution: all of it is noise
        return NOISE_FACTOR * baseline_error
    return FACTOR * baseline_error + FLOOR


def float32_violation(actual: torch.Tensor, exact: torch.Tensor, baseline: torch.Tensor) -> str | None:
    """Why ``actual`` fails the rule against ``exact`` (float64) and ``baseline`` (plain PyTorch in
    float32), or None when it passes."""
    return _judge(actual, exact, baseline, exact)


def assert_float32_close(actual: torch.Tensor, exact: torch.Tensor, baseline: torch.Tensor, what: str = "") -> None:
    """Kernel-level form of the rule: ``actual`` (float32) against ``exact`` (float64), the bound from
    ``baseline``, the same quantity computed by plain PyTorch in float32."""
    problem = float32_violation(actual, exact, baseline)
    assert problem is None, f"{what}: {problem}" if what else problem


def _step(module: nn.Module, x: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
    """One training step's results by name: the output, the input gradient, every parameter gradient."""
    from helpers import run_step

    y, dx, grads = run_step(module, x, grad_out_seed=step)
    for p in module.parameters():
        p.grad = None
    return {"output": y, "input grad": dx, **{f"grad {name}": g for name, g in grads.items()}}


def _buffers(module: nn.Module) -> dict[str, torch.Tensor]:
    return {f"buffer {n.removeprefix('_orig_mod.')}": b for n, b in module.named_buffers()}


def assert_float32_agrees(
    ref: nn.Module,
    candidate: nn.Module,
    x: torch.Tensor,
    steps: int = 2,
    baseline: str = "eager",
    baseline_scale: float = 1.0,
    unchecked: tuple[str, ...] = (),
) -> None:
    """Module-level form: ``candidate`` (float32; a backend's twin of ``ref``, possibly compiled) against
    ``ref``'s math run by the 'reference' backend in float64 on the same float32 parameters and data, over
    ``steps`` training steps (output, input gradient, every parameter gradient) and the buffers after them.
    The bound comes from ``ref`` on the ``baseline`` backend in float32. For data past what plain PyTorch's
    float32 can take (its batch norm squares the values), ``baseline_scale`` (a power of two) divides the
    baseline's input and every norm's eps by its square, which is the same function: relative errors do not
    change with a power-of-two scale where nothing overflows. Results whose names contain one of
    ``unchecked`` are left out (each caller says why)."""
    from helpers import twin

    assert x.dtype == torch.float32, x.dtype
    assert math.frexp(baseline_scale)[0] == 0.5, "baseline_scale must be a power of two (an exact division)"
    exact_module = twin(ref, "reference").float().double()  # the candidate's own (float32) parameters
    baseline_module = _scaled_eps(twin(ref, baseline).float(), baseline_scale)
    # the baseline's own float64 result: the exact one, unless its input is scaled
    plain_exact_module = None if baseline_scale == 1 else _scaled_eps(twin(exact_module, "reference"), baseline_scale)
    x_plain = x / baseline_scale
    problems = []
    for step in range(steps):
        exact, got = _step(exact_module, x.double(), step), _step(candidate, x, step)
        plain = _step(baseline_module, x_plain, step)
        plain_exact = exact if plain_exact_module is None else _step(plain_exact_module, x_plain.double(), step)
        assert got["output"].dtype == torch.float32, got["output"].dtype
        problems += _compare(f"step {step}, ", got, exact, plain, plain_exact, unchecked)
    exact = _buffers(exact_module)
    plain_exact = exact if plain_exact_module is None else _buffers(plain_exact_module)
    problems += _compare("", _buffers(candidate), exact, _buffers(baseline_module), plain_exact, unchecked)
    assert not problems, "float32 results outside the bound:\n" + "\n".join(problems)


def _compare(prefix: str, got: dict, exact: dict, plain: dict, plain_exact: dict, unchecked: tuple) -> list[str]:
    """The rule on each named result (integer ones, num_batches_tracked, exactly equal); what fails."""
    assert got.keys() == exact.keys(), (sorted(got), sorted(exact))
    problems = []
    for name in exact:
        if any(part in name for part in unchecked):
            continue
        if not exact[name].dtype.is_floating_point:
            assert torch.equal(got[name].cpu(), exact[name].cpu()), name
        elif problem := _judge(got[name], exact[name], plain[name], plain_exact[name]):
            problems.append(f"{prefix}{name}: {problem}")
    return problems


def _scaled_eps(module: nn.Module, scale: float) -> nn.Module:
    """``module`` with its norms' eps divided by ``scale``**2: on inputs divided by ``scale``, the function
    of the original on the original inputs (a norm's variance scales by ``scale``**2)."""
    for m in module.modules():
        if hasattr(m, "config"):  # a PNNH block: its norms' eps is the config's
            m.config = dataclasses.replace(m.config, eps=m.config.eps / scale**2)
    return module


def _judge(
    actual: torch.Tensor, exact: torch.Tensor, baseline: torch.Tensor, baseline_exact: torch.Tensor
) -> str | None:
    """The rule on relative errors, the baseline's measured against its own float64 result."""
    error, baseline_error = relative_error(actual, exact), relative_error(baseline, baseline_exact)
    if error <= float32_bound(baseline_error):
        return None
    return f"relative error {error:.3g} > bound {float32_bound(baseline_error):.3g} (plain PyTorch float32: {baseline_error:.3g})"
