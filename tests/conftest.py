import warnings

import pytest
import torch
from helpers import gpu_exact_math
from triton_devices import DEVICES


@pytest.fixture(autouse=True)
def _seed_and_quiet():
    torch.manual_seed(0)
    with warnings.catch_warnings():
        # the one-time 'falling back to eager' notice is tested on its own in test_dispatch.py
        warnings.filterwarnings("ignore", message="pnnh_kernels: falling back")
        yield


@pytest.fixture(params=DEVICES)
def device(request):
    """Each device the Triton tests run on (triton_devices.py)."""
    if request.param == "cuda":
        gpu_exact_math()
    return request.param
