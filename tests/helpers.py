"""Helpers shared by the tests: build twin modules on two backends and compare all they produce."""

from __future__ import annotations

import copy
from typing import Optional

import torch
from torch import nn

# Tolerances (rtol, atol) for comparing two float64 implementations of the block. float32 results are
# judged against float64 with a bound from plain PyTorch's own float32 error instead (accuracy.py).
TOLERANCES = {
    torch.float64: (1e-10, 1e-10),
}


# PNNHLinear configurations every fused linear backend is checked on
LINEAR_CASES = {
    "relu": dict(),
    "gelu_no_final": dict(activation="gelu", final_activation=False),
    "leaky_scaled": dict(activation="leaky_relu", negative_slope=0.2, activation_scale=1.4),
    "untied_out_ne_in": dict(tied=False, out_features=5),
    "narrow_coder": dict(coder_features=3),
}


def twin(module: nn.Module, backend: str) -> nn.Module:
    """A deep copy of ``module`` (same parameters and buffers) on another backend."""
    other = copy.deepcopy(module)
    for m in other.modules():
        if hasattr(m, "backend"):
            m.backend = backend
    return other


def randomize_norms(module: nn.Module, seed: int = 0) -> None:
    """Non-trivial affine parameters and running statistics, so that no mistake hides behind 1s and 0s."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm)):
                if m.weight is not None:
                    m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=g))
                    m.bias.copy_(0.3 * torch.randn(m.bias.shape, generator=g))
                if getattr(m, "running_mean", None) is not None:
                    m.running_mean.copy_(0.2 * torch.randn(m.running_mean.shape, generator=g))
                    m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))


def run_step(module: nn.Module, x: torch.Tensor, grad_out_seed: int = 1, autocast: Optional[torch.dtype] = None):
    """Forward (under torch.autocast in ``autocast`` when given), then backward with a fixed random
    cotangent; returns (y, dx, {param: grad})."""
    x = x.detach().clone().requires_grad_(True)
    with torch.autocast(x.device.type, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        y = module(x)
    g = torch.Generator().manual_seed(grad_out_seed)
    cotangent = torch.randn(y.shape, generator=g, dtype=torch.float64).to(device=y.device, dtype=y.dtype)
    (y * cotangent).sum().backward()
    # torch.compile wraps the module: strip its prefix so names compare across the twins
    grads = {name.removeprefix("_orig_mod."): p.grad.detach().clone() for name, p in module.named_parameters()}
    return y.detach(), x.grad.detach(), grads


def assert_modules_agree(a: nn.Module, b: nn.Module, x: torch.Tensor, rtol: float, atol: float, steps: int = 2) -> None:
    """Same outputs, input gradient, every parameter gradient and every buffer, over ``steps`` steps."""
    for step in range(steps):
        ya, dxa, ga = run_step(a, x, grad_out_seed=step)
        yb, dxb, gb = run_step(b, x, grad_out_seed=step)
        torch.testing.assert_close(yb, ya, rtol=rtol, atol=atol, msg=lambda m: f"output, step {step}: {m}")
        torch.testing.assert_close(dxb, dxa, rtol=rtol, atol=atol, msg=lambda m: f"input grad, step {step}: {m}")
        assert ga.keys() == gb.keys()
        for name in ga:
            torch.testing.assert_close(gb[name], ga[name], rtol=rtol, atol=atol, msg=lambda m: f"grad {name}: {m}")
        for a_p, b_p in zip(a.parameters(), b.parameters()):
            a_p.grad = b_p.grad = None
    buffers_a, buffers_b = ({n.removeprefix("_orig_mod."): t for n, t in m.named_buffers()} for m in (a, b))
    assert buffers_a.keys() == buffers_b.keys()
    for name in buffers_a:
        torch.testing.assert_close(
            buffers_b[name], buffers_a[name], rtol=rtol, atol=atol, msg=lambda m: f"buffer {name}: {m}"
        )


def assert_matches_reference(
    ref: nn.Module, candidate: nn.Module, x: torch.Tensor, steps: int = 2, baseline: str = "eager"
) -> None:
    """``candidate`` (a twin of ``ref`` on another backend, possibly compiled) computes ``ref``'s block: in
    float64 within the fixed tolerance; in float32 within the bound that ``ref`` on the ``baseline`` backend
    in float32 sets, both judged against float64 (accuracy.py)."""
    if x.dtype == torch.float64:
        assert_modules_agree(ref, candidate, x, *TOLERANCES[torch.float64], steps=steps)
    else:
        from accuracy import assert_float32_agrees

        assert_float32_agrees(ref, candidate, x, steps=steps, baseline=baseline)


# Block configurations every fused backend is checked on (odd widths, both coder kernel sizes, untied...).
BLOCK_CASES = {
    "default": dict(),
    "leaky_scaled": dict(activation="leaky_relu", negative_slope=0.2, activation_scale=1.3),
    "identity": dict(activation="identity"),
    "no_final_act": dict(final_activation=False),
    "untied": dict(tied=False),
    "untied_in_ne_out": dict(tied=False, out_channels=4),
    "coder_3x3": dict(coder_kernel_size=3),
    "untied_coder_3x3": dict(tied=False, coder_kernel_size=3),
    "learner_1x1_coder_3x3": dict(kernel_size=1, coder_kernel_size=3),
    "same_kernels_1x1": dict(kernel_size=1),
    "narrow_coder_wide_learner": dict(coder_channels=3, hidden_channels=11),
}


def gpu_exact_math():
    """fp32 on a GPU compared at fp32 tolerance: no TF32 in cuDNN / cuBLAS (the default lets convs use it)."""
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False


def low_precision_errors(
    block64: nn.Module, backend: str, x64: torch.Tensor, dtype: torch.dtype, autocast: bool = False
) -> dict[str, float]:
    """Largest error, over the output, the input gradient and every parameter gradient, of ``backend``
    and of 'eager' run in ``dtype`` (or, with ``autocast``, float32 parameters and data under autocast to
    ``dtype``), against ``block64`` (float64). One training step each."""
    expected = run_step(block64, x64)
    errors = {}
    for name in ("eager", backend):
        storage = torch.float32 if autocast else dtype
        m = twin(block64, name).to(storage)
        y, dx, grads = run_step(m, x64.to(storage), autocast=dtype if autocast else None)
        assert y.dtype == dtype and all(g.dtype == storage for g in grads.values()), name
        worst = max((y.double() - expected[0]).abs().max().item(), (dx.double() - expected[1]).abs().max().item())
        for key, g in grads.items():
            ref = expected[2][key]
            worst = max(worst, (g.double() - ref).abs().max().item() / max(ref.abs().max().item(), 1.0))
        errors[name] = worst
    return errors


def block_gradcheck(block: nn.Module, x: torch.Tensor, *, fast_mode: bool = False) -> bool:
    """gradcheck of a conv block over its input and every parameter (float64). In training, the running
    statistics are dropped first: their updates would make repeated evaluations differ."""
    if block.training:
        for m in block.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.track_running_stats, m.running_mean, m.running_var = False, None, None
    names = [n for n, _ in block.named_parameters()]

    def fn(inp, *params):
        return torch.func.functional_call(block, dict(zip(names, params)), (inp,))

    return torch.autograd.gradcheck(fn, (x, *block.parameters()), fast_mode=fast_mode)


def op_args(block: nn.Module, x: torch.Tensor, use_batch: bool = True) -> tuple:
    """The arguments of a fused block op (:class:`~pnnh_kernels.backends.contract.BlockArgs`) for ``block``, as
    the custom op takes them (conv: batch statistics, so no running ones)."""
    from pnnh_kernels.backends.contract import block_args

    return tuple(block_args(x, block.block_weights(), block.block_norms(), block.config, use_batch=use_batch))


def write_image_folder(root, classes=("cat", "dog"), per_class=3) -> None:
    """An ImageFolder data set: ``root/{train,val}/<class>/<i>.png``, small random images."""
    import os

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for part in ("train", "val"):
        for c in classes:
            os.makedirs(os.path.join(root, part, c))
            for i in range(per_class):
                arr = rng.integers(0, 256, (20 + i, 24, 3), dtype=np.uint8)
                Image.fromarray(arr).save(os.path.join(root, part, c, f"{i}.png"))
