"""Every C++ source of the extension compiles against a CUDA build of torch with the cuDNN fused graphs on:
csrc/cuda/cudnn_fused.cpp, the bindings that expose it, the CUDA glue and the CPU kernels (torch 2.14's
headers need C++20, which setup.py then uses).

It needs a CUDA build of torch (ATen's cuDNN handle), the CUDA toolkit's headers, cuDNN's headers and the
cudnn-frontend headers: CI's zoo stage has all four (torch 2.14.1 from PyPI pulls nvidia-cudnn-cu13;
`.ci/zoo` installs nvidia-cudnn-frontend). Elsewhere the test skips. Running the graphs needs a GPU:
tests/backends/test_cudnn_fused.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig

import pytest
import torch
from torch.utils import cpp_extension

from pnnh_kernels._extension import cxx_standard

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "tools"))
from cudnn_frontend_paths import cudnn_include, frontend_include  # noqa: E402


def _cuda_include() -> str | None:
    for home in (os.environ.get("CUDA_HOME", ""), "/usr/local/cuda", cpp_extension.CUDA_HOME or ""):
        if home and os.path.isfile(os.path.join(home, "include", "cuda_runtime.h")):
            return os.path.join(home, "include")
    return None


def _cuda_library_includes() -> list[str]:
    """The CUDA library headers torch's wheels install (cusparse.h and the like, which ATen's CUDA headers include)."""
    import importlib.util

    spec = importlib.util.find_spec("nvidia")
    roots = list(spec.submodule_search_locations or []) if spec else []
    return [os.path.join(r, "cu13", "include") for r in roots if os.path.isdir(os.path.join(r, "cu13", "include"))]


def _includes() -> list[str] | None:
    found = [frontend_include(), cudnn_include(), _cuda_include()]
    if torch.version.cuda is None or None in found:
        return None
    return [*cpp_extension.include_paths("cuda"), sysconfig.get_paths()["include"], *found, *_cuda_library_includes()]


SOURCES = sorted(
    os.path.relpath(os.path.join(folder, name), os.path.join(ROOT, "csrc"))
    for folder in (os.path.join(ROOT, "csrc"), os.path.join(ROOT, "csrc", "cpu"), os.path.join(ROOT, "csrc", "cuda"))
    for name in os.listdir(folder)
    if name.endswith(".cpp")
)


def test_the_sources_are_found():
    assert {"bindings.cpp", "cuda/cudnn_fused.cpp", "cuda/bn_act_torch.cpp"} <= set(SOURCES)


@pytest.mark.skipif(_includes() is None, reason="needs a CUDA torch and the CUDA, cuDNN and cudnn-frontend headers")
@pytest.mark.parametrize("source", SOURCES)
def test_the_extension_compiles_against_a_cuda_torch(source):
    flags = [
        f"-std={cxx_standard()}",
        "-fsyntax-only",
        "-DPNNH_WITH_CUDA",
        "-DPNNH_WITH_CUDNN_FRONTEND",
        "-DNV_CUDNN_FRONTEND_USE_DYNAMIC_LOADING",
        "-DTORCH_EXTENSION_NAME=_C",
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
    ]
    cmd = ["g++", *flags, *[f"-I{d}" for d in _includes()], os.path.join(ROOT, "csrc", source)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
