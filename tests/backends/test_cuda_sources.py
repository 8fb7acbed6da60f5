"""Every CUDA kernel file compiles with nvcc, on any machine that has nvcc (the CPU machines have it).

The .cu files need only the CUDA toolkit (raw pointers, sizes, a stream), so a broken kernel cannot land
even where torch has no CUDA. Without nvcc the test is skipped.
"""

import glob
import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CU_FILES = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))


def _nvcc():
    home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    candidate = os.path.join(home, "bin", "nvcc")
    return candidate if os.path.isfile(candidate) else shutil.which("nvcc")


@pytest.mark.skipif(_nvcc() is None, reason="nvcc not found")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("path", CU_FILES, ids=[os.path.basename(p) for p in CU_FILES])
def test_cuda_kernels_compile(path, arch, tmp_path):
    cmd = [_nvcc(), "-c", "-std=c++17", "-O3", f"-arch={arch}", path, "-o", str(tmp_path / "kernel.o")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    assert (tmp_path / "kernel.o").stat().st_size > 0


def test_there_are_cuda_sources_to_check():
    assert CU_FILES, "csrc/cuda holds no .cu file"
