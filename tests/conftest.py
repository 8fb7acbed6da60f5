import warnings

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_and_quiet():
    torch.manual_seed(0)
    with warnings.catch_warnings():
        # the one-time 'falling back to eager' notice is tested on its own in test_dispatch.py
        warnings.filterwarnings("ignore", message="pnnh_kernels: falling back")
        yield
