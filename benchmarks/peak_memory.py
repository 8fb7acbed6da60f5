"""Peak memory of CPU inference, measured in a fresh process: the growth of its peak resident set (Linux's
VmHWM, reset after the imports) from building the model or runtime session to the end of two inference calls.
That is what serving the net costs in memory: weights, the runtime's caches and arenas, and the largest
activations. A fresh process per variant, because a process that already ran other nets keeps their memory in
its allocators and would under-report.

Run as a script by :func:`peak_inference_mb`; prints one JSON line ``{"peak_mb": ...}``."""

from __future__ import annotations

import json
import os
import subprocess
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))


def peak_inference_mb(spec: dict) -> float:
    """``spec``: ``{"batch": N, "model": NAME, "how": "trained"|FORM}`` for PyTorch eager, or
    ``{"batch": N, "onnx": PATH}`` for an exported file in onnxruntime."""
    done = subprocess.run(
        [sys.executable, os.path.join(_HERE, "peak_memory.py"), json.dumps(spec)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if done.returncode != 0:
        raise RuntimeError(f"peak-memory run failed: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])["peak_mb"]


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1])


def _runner(spec: dict):
    import torch
    from deployed_nets import deployed_model, eager_call

    x = torch.randn(spec["batch"], 3, 32, 32)
    if "onnx" in spec:
        from pnnh_kernels.train.export import _onnx_runner

        run = _onnx_runner(spec["onnx"])
        return lambda: run(x)
    return eager_call(deployed_model(spec["model"], spec["how"]), x)


def _main(spec: dict) -> None:
    import torch  # noqa: F401  (imported before the reset: the interpreter and libraries are not the net's)

    import pnnh_kernels  # noqa: F401

    before = _status_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS now
    run = _runner(spec)
    run(), run()
    print(json.dumps({"peak_mb": (_status_kb("VmHWM") - before) / 1024}))


if __name__ == "__main__":
    _main(json.loads(sys.argv[1]))
