"""Seeded fuzzing: every backend that runs here against the float64 reference, over random block options,
shapes (batch 1, 1-pixel maps), layouts, train / eval, dtypes and magnitudes (up to 1e19 on the fused
backends, whose statistics are overflow-safe; eager's float32 batch norm is not past ~1e18)."""

import math
import random

import pytest
import torch
from accuracy import RUNNING_VAR_PAST_FLOAT32, assert_float32_agrees
from helpers import randomize_norms, run_step, twin
from triton_devices import interpreting

import pnnh_kernels as pk
from pnnh_kernels._extension import extension_error
from pnnh_kernels.backends import refusal_reason, registered_backends

CASES = 40


def _case(seed: int) -> dict:
    rng = random.Random(seed)
    kernel = rng.choice([1, 3])
    tied = rng.random() < 0.6
    channels = rng.randint(1, 6)
    return dict(
        options=dict(
            kernel_size=kernel,
            coder_kernel_size=rng.choice([1, kernel]) if kernel == 3 else 1,
            hidden_channels=rng.randint(1, 7),
            coder_channels=rng.randint(1, 6),
            tied=tied,
            out_channels=channels if tied else rng.randint(1, 6),
            activation=rng.choice(["relu", "leaky_relu", "identity"]),
            final_activation=rng.random() < 0.7,
        ),
        channels=channels,
        shape=(rng.randint(1, 3), rng.randint(1, 6), rng.randint(1, 6)),
        channels_last=rng.random() < 0.5,
        training=rng.random() < 0.7,
        dtype=rng.choice([torch.float32, torch.float64]),
        magnitude=10 ** rng.uniform(-2, 6) if rng.random() < 0.8 else 1e19,
        seed=seed,
    )


def _backends() -> list[str]:
    names = ["eager"]
    if extension_error() is None:
        names.append("cpu")
    if interpreting():
        names.append("triton")
    return names


def _applicable(case: dict, backend: str) -> bool:
    n, h, w = case["shape"]
    if case["training"] and n * h * w < (8 if case["dtype"] == torch.float32 else 2):
        return False  # batch statistics of a few values: float32 gradients are ill-conditioned there
    if case["magnitude"] > 1e15 and (backend == "eager" or case["dtype"] != torch.float32):
        return False
    # the interpreter is slow: a quarter of the cases, and every extreme one
    return not (backend == "triton" and case["seed"] % 4 and case["magnitude"] < 1e15)


@pytest.mark.parametrize(
    "seed, backend",
    [(seed, b) for seed in range(CASES) for b in _backends() if _applicable(_case(seed), b)],
)
def test_backend_matches_the_float64_reference(seed, backend):
    case = _case(seed)
    torch.manual_seed(seed)
    ref = pk.PNNHConv2d(case["channels"], backend="reference", **case["options"]).double()
    randomize_norms(ref, seed)
    ref.train(case["training"])
    n, h, w = case["shape"]
    x = torch.randn(n, case["channels"], h, w, dtype=torch.float64) * case["magnitude"]
    block = twin(ref, backend).to(case["dtype"])
    xb = x.to(case["dtype"])
    if case["channels_last"]:
        block = block.to(memory_format=torch.channels_last)
        xb = xb.contiguous(memory_format=torch.channels_last)
    reason = refusal_reason(registered_backends()[backend], "conv2d", xb, block.block_weights(), block.config)
    assert reason is None, reason
    if case["dtype"] == torch.float64:
        _assert_float64_close(ref, block, x, xb)
    else:
        # past 1e15 eager's float32 batch norm overflows: its bound is measured on the data scaled down
        scale = 2.0 ** round(math.log2(case["magnitude"])) if case["magnitude"] > 1e15 else 1.0
        assert_float32_agrees(
            ref, block, xb, steps=1, baseline_scale=scale, unchecked=RUNNING_VAR_PAST_FLOAT32 if scale > 1 else ()
        )


def _assert_float64_close(ref, block, x: torch.Tensor, xb: torch.Tensor, tol: float = 1e-9) -> None:
    """float64 against float64 (``xb``: ``x`` in the block's layout): tight, each gradient's tolerance
    scaled to its own magnitude."""
    y64, dx64, grads64 = run_step(ref, x)
    y, dx, grads = run_step(block, xb)
    torch.testing.assert_close(y, y64, rtol=tol, atol=tol)
    torch.testing.assert_close(dx, dx64, rtol=tol, atol=tol * dx64.abs().max().item())
    for name, g64 in grads64.items():
        torch.testing.assert_close(grads[name], g64, rtol=tol, atol=tol * max(1.0, g64.abs().max().item()))
    for (name, b64), (_, b) in zip(ref.named_buffers(), block.named_buffers()):
        if b64.dtype.is_floating_point:
            torch.testing.assert_close(b, b64, rtol=tol, atol=tol, msg=lambda m, name=name: f"{name}: {m}")
