"""Where the Triton tests run: CPU tensors under ``TRITON_INTERPRET=1`` (CI), CUDA tensors compiled on a
GPU machine without it. Test modules import ``device`` (a fixture), ``DEVICES`` and ``exact_dtype``."""
import pytest
import torch

from helpers import gpu_exact_math
from pnnh_kernels.triton_kernels import interpreting

DEVICES = (["cpu"] if interpreting() else []) + (["cuda"] if torch.cuda.is_available() and not interpreting() else [])
ON_GPU = "cuda" in DEVICES
requires_a_device = pytest.mark.skipif(not DEVICES, reason="no CUDA device, and TRITON_INTERPRET=1 is not set")


@pytest.fixture(params=DEVICES)
def device(request):
    if request.param == "cuda":
        gpu_exact_math()
    return request.param


def exact_dtype(device: str) -> torch.dtype:
    """float64 in the interpreter; float32 on a GPU, where Triton's dot has no float64."""
    return torch.float64 if device == "cpu" else torch.float32
