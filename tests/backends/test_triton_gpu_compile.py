"""Every Triton kernel compiles for a GPU (sm_90) on this CPU machine: tools/compile_triton_kernels.py runs
a conv and a linear block on the `triton` backend in float32 and under bfloat16 autocast while Triton
targets sm_90, so each launch goes through the whole compiler (front end to ptxas) and is skipped. The
interpreter, which runs the kernels everywhere else in the tests, checks none of the GPU compiler's rules.
Skipped on a GPU machine, whose own tests compile the kernels for real."""

import importlib
import json
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction

TOOL = Path(__file__).resolve().parents[2] / "tools" / "compile_triton_kernels.py"

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU machine compiles the kernels for real")


def _kernels() -> set[str]:
    """The kernels the package defines (module-level JIT functions and autotuners named *_kernel)."""
    import pnnh_kernels.triton_kernels as package

    names = set()
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        names |= {
            n for n, v in vars(module).items() if n.endswith("_kernel") and isinstance(v, (JITFunction, Autotuner))
        }
    return names


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_every_triton_kernel_compiles_for_sm90(dtype):
    """One run per dtype: each compiles every kernel, and the two can run on two test workers at once."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    done = subprocess.run(
        [sys.executable, str(TOOL), "--arch", "90", "--dtypes", dtype, "--quick"],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert done.stdout.strip(), done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["failures"] == {}, report["failures"]
    assert done.returncode == 0, done.stderr[-3000:]
    missing = _kernels() - set(report["compiled"])
    assert not missing, f"kernels no block launched (add a block that does to the tool): {sorted(missing)}"
