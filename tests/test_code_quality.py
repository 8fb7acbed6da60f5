"""The repository's own checks: ruff (lint and format) and mypy (the pnnh_kernels package), configured in
pyproject.toml. They run from the source tree, so the tests fail when a change leaves findings."""

import ast
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, check=False)


@pytest.mark.parametrize(
    "command", [("ruff", "check", "."), ("ruff", "format", "--check", ".")], ids=["lint", "format"]
)
def test_ruff_finds_nothing(command):
    result = _run(*command)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.slow
def test_mypy_finds_nothing():
    result = _run("mypy")
    assert result.returncode == 0, result.stdout + result.stderr


def _triton_functions() -> list[tuple[str, "ast.FunctionDef"]]:
    """Every ``@triton.jit`` function of triton_kernels/, with its file's name."""
    found = []
    for path in sorted((ROOT / "triton_kernels").glob("*.py")):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.FunctionDef) and any("jit" in ast.unparse(d) for d in node.decorator_list):
                found.append((f"{path.name}:{node.name}", node))
    return found


def test_every_triton_kernel_says_what_it_computes_and_names_its_strides():
    """A docstring on every JIT function; stride arguments as stride_<tensor>_<dim>, not abbreviations
    (sxn, swk, son...)."""
    functions = _triton_functions()
    assert len(functions) > 30, "the scan found too few Triton functions to be looking in the right place"
    undocumented = [name for name, fn in functions if not ast.get_docstring(fn)]
    abbreviated = re.compile(r"^s(x|w|a|b|o|s|u|dy)[a-z]{0,3}$")
    bad_strides = [
        f"{name}({arg.arg})"
        for name, fn in functions
        for arg in fn.args.args
        if abbreviated.match(arg.arg) or (arg.arg.startswith("stride") and not re.match(r"^stride_\w+_\w+$", arg.arg))
    ]
    assert undocumented == [], undocumented
    assert bad_strides == [], bad_strides
