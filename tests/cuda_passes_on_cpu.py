"""The test-only CPU passes of the 'cuda' op (tests/cuda_passes_cpu/): compiled on first use, then cached by torch.

They stand in for the 'cuda' backend's CUDA kernels so that its op (backends/cuda/conv.py), which
calls the passes through ``extension()``, runs on CPU tensors in the tests."""

import functools
import pathlib
from types import ModuleType

from torch.utils.cpp_extension import load

from pnnh_kernels._extension import cxx_standard

_SOURCES = pathlib.Path(__file__).resolve().parent / "cuda_passes_cpu"


@functools.lru_cache(maxsize=1)
def cuda_passes_on_cpu() -> ModuleType:
    return load(
        name="pnnh_test_cuda_passes_cpu",
        sources=[str(_SOURCES / "bindings.cpp"), str(_SOURCES / "bn_act_maps.cpp")],
        extra_include_paths=[str(_SOURCES.parents[1] / "csrc" / "cpu")],  # norm_checks.h, vector_clones.h
        extra_cflags=["-O2", f"-std={cxx_standard()}", "-fopenmp"],
        extra_ldflags=["-fopenmp"],
    )


def run_cuda_op_on_cpu_kernels(monkeypatch) -> None:
    """Make the 'cuda' backend's op call the CPU passes of the 'cuda' op (for the rest of the test)."""
    from pnnh_kernels.backends.cuda import conv

    monkeypatch.setattr(conv, "extension", cuda_passes_on_cpu)
