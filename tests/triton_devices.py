"""Where the Triton tests run: CPU tensors under ``TRITON_INTERPRET=1`` (CI), CUDA tensors compiled on a
GPU machine without it. Test modules import ``DEVICES``, ``exact_dtype`` and ``requires_a_device``; the
``device`` fixture (conftest.py) runs a test once per entry of ``DEVICES``."""

import os

import pytest
import torch


def interpreting() -> bool:
    """``TRITON_INTERPRET=1``: Triton kernels run on the CPU (no triton import needed to know it)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


DEVICES = (["cpu"] if interpreting() else []) + (["cuda"] if torch.cuda.is_available() and not interpreting() else [])
ON_GPU = "cuda" in DEVICES
requires_a_device = pytest.mark.skipif(not DEVICES, reason="no CUDA device, and TRITON_INTERPRET=1 is not set")


def exact_dtype(device: str) -> torch.dtype:
    """float64 in the interpreter; float32 on a GPU, where Triton's dot has no float64."""
    return torch.float64 if device == "cpu" else torch.float32


def kernel_tolerance(dtype: torch.dtype) -> dict[str, float]:
    """``assert_close`` keywords for one Triton kernel against PyTorch in ``dtype``: float64 (the interpreter,
    CI) tight; float32 (compiled, GPU machines only) still the fixed bound these kernel-level checks had, as
    they have not run on a GPU since the block-level checks moved to the float64-judged rule (accuracy.py)."""
    return dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
