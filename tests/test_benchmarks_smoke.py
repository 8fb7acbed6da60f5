"""`pytest benchmarks/` must run on a fresh machine: its smoke set runs here and writes a results file."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_benchmark_suite_smoke_run(tmp_path):
    out = tmp_path / "bench"
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "benchmarks/",
        "--bench-smoke",
        "--bench-results",
        str(out),
        "-q",
        "-p",
        "no:cacheprovider",
    ]
    # run from a scratch copy of benchmarks/ so the source tree is never written; python -m pytest puts the
    # working directory on sys.path, so the scratch folder holds benchmarks/ alone (no source package)
    work = tmp_path / "work"
    work.mkdir()
    os.symlink(os.path.join(ROOT, "benchmarks"), work / "benchmarks")
    (work / "pyproject.toml").write_text("[tool.pytest.ini_options]\naddopts = '--import-mode=importlib'\n")
    # a pytest of its own, not one of this run's xdist workers (pytest-benchmark times nothing inside those)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")}
    done = subprocess.run(cmd, cwd=work, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    payload = json.loads((out / "results" / "cpu.json").read_text())
    variants = {r["variant"] for r in payload["records"] if r["kind"] == "conv"}
    assert {"eager", "reference", "residual"} <= variants
    text = (out / "RESULTS.md").read_text()
    assert "### Targets" in text and "conv block, smoke" in text
    pairs = [r for r in payload["records"] if r["kind"] == "head_to_head"]
    assert {r["block"] for r in pairs} == {"conv", "linear", "attention", "model"}
    assert any(r["shape"].startswith("deploy:") for r in pairs)  # the deploy targets, interleaved
    assert all(r["pairs"] == 3 and r["ratio_median"] > 0 for r in pairs)
    assert "### Head to head" in text


def test_the_model_step_benchmark_runs_and_writes_its_table(tmp_path):
    """benchmarks/model_step.py is what a GPU session runs (gpu_session.sh model): its smoke mode runs here."""
    out = tmp_path / "model"
    cmd = [sys.executable, "-P", os.path.join(ROOT, "benchmarks", "model_step.py"), str(out), "--smoke", "--profile"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = json.loads((out / "model_step.json").read_text())["rows"]
    measured = {(r["dtype"], r["variant"]): r for r in rows if "error" not in r}
    assert {
        ("bf16", "resnet eager"),
        ("bf16", "pnnh eager"),
        ("fp16", "pnnh auto"),
        ("bf16", "pnnh auto measured"),
    } <= set(measured)
    assert measured[("bf16", "pnnh eager")]["vs pnnh eager"] == pytest.approx(1.0)
    table = (out / "model_step.md").read_text()
    assert "| cifar56 | bf16 | pnnh eager |" in table and "### pnnh eager:" in table
