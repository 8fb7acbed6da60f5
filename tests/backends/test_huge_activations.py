"""Huge activations do not overflow the normalisation statistics, on any fused backend: squares of float32
values past ~1e19 overflow float32 (eager's own float32 batch norm is already wrong there), so the float64
reference block is the oracle. Every backend that runs on this machine takes part: `cpu` with the
extension, `triton` in the interpreter (CPU) or compiled (GPU), `cuda` on a GPU."""

import math

import pytest
import torch
from accuracy import RUNNING_VAR_PAST_FLOAT32, assert_float32_agrees
from helpers import randomize_norms, twin
from triton_devices import DEVICES

import pnnh_kernels as pk
from pnnh_kernels._extension import extension_error


def _backends() -> list[tuple[str, str]]:
    """(backend, device) pairs this machine can run."""
    found = []
    if extension_error() is None:
        found.append(("cpu", "cpu"))
        if torch.cuda.is_available():
            found.append(("cuda", "cuda"))
    found += [("triton", device) for device in DEVICES]
    return found


BLOCKS = {
    "conv": (lambda **o: pk.PNNHConv2d(16, backend="reference", **o), (4, 16, 6, 6)),
    "conv_3x3_coder": (lambda **o: pk.PNNHConv2d(16, backend="reference", coder_kernel_size=3, **o), (4, 16, 6, 6)),
    "conv_untied": (lambda **o: pk.PNNHConv2d(16, backend="reference", tied=False, out_channels=8, **o), (4, 16, 6, 6)),
    "linear": (lambda **o: pk.PNNHLinear(16, backend="reference", **o), (12, 16)),
}


@pytest.mark.parametrize("backend, device", _backends())
@pytest.mark.parametrize("block", list(BLOCKS))
@pytest.mark.parametrize("scale", [1e19, 1e30], ids=["1e19", "1e30"])
def test_huge_activations_match_float64(backend, device, block, scale):
    make, shape = BLOCKS[block]
    torch.manual_seed(0)
    ref = make()
    randomize_norms(ref)
    x = (torch.randn(*shape, dtype=torch.float64) * scale).float().to(device)
    fused = twin(ref, backend).to(device)
    if block.startswith("conv") and scale > 1e20:
        # the conv coder's moments-form gradients (dx, encoder) cancel float32 digits away there: the
        # output and running means only, against the float64 reference
        y, y64 = fused(x), twin(ref, "reference").double().to(device)(x.double())
        torch.testing.assert_close(y.double(), y64, rtol=1e-5, atol=1e-5)
        assert all(torch.isfinite(b).all() for n, b in fused.named_buffers() if "running_mean" in n)
        return
    # eager's float32 batch norm overflows at this scale: its bound is measured on the data scaled down
    assert_float32_agrees(
        ref.to(device),
        fused,
        x,
        steps=1,
        baseline_scale=2.0 ** round(math.log2(scale)),
        unchecked=RUNNING_VAR_PAST_FLOAT32,
    )
