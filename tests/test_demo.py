"""``python -m pnnh_kernels.demo`` runs on any machine: backends that cannot run here are named, not fatal."""

import os
import subprocess
import sys


def test_demo_runs_and_names_what_is_not_available(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # as a user's shell has it
    args = ["--batch", "2", "--channels", "4", "--size", "4", "--repeats", "1"]
    result = subprocess.run(
        [sys.executable, "-m", "pnnh_kernels.demo", *args],
        capture_output=True,
        text=True,
        env=env,
        check=False,
        cwd=tmp_path,  # the installed package: from the repository root, -m would import the source tree
    )
    assert result.returncode == 0, result.stderr
    assert "reference: forward+backward" in result.stdout and "eager: forward+backward" in result.stdout
    assert "not here (" in result.stdout  # on a CPU machine: cuda, and triton without its interpreter
