"""Which of the PNNH layer patterns cuDNN fuses at the models' shapes, and what fusing saves (GPU).

For every shape (ResNet-56 at batch 256, ResNet-34 at batch 128), dtype (float16, bfloat16) and pattern
(conv + statistics; BN-apply + ReLU + conv + statistics; and the backward, dgrad -> dReLU -> BN backward
weight plus the input-gradient pass): cuDNN's support answer, and where it has an engine the time of the
fused graph against the same work as PyTorch ops (elementwise passes, cuDNN convolutions, reductions),
both on channels_last data, median of CUDA-event timings. Writes OUT/cudnn_probe.json and
OUT/cudnn_probe.md.

    python3 -P benchmarks/cudnn_probe.py OUT
"""

from __future__ import annotations

import json
import os
import statistics
import sys

import torch
import torch.nn.functional as F

from pnnh_kernels.backends.cuda import cudnn_fused

SHAPES = {  # name: (batch, channels, size)
    "resnet56 stage1": (256, 16, 32),
    "resnet56 stage2": (256, 32, 16),
    "resnet56 stage3": (256, 64, 8),
    "resnet34 stage1": (128, 64, 56),
    "resnet34 stage2": (128, 128, 28),
    "resnet34 stage3": (128, 256, 14),
    "resnet34 stage4": (128, 512, 7),
}


def _time(fn, repeats: int = 30) -> float:
    for _ in range(5):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return statistics.median(times)


def _unfused(x, w, scale, bias):
    inp = x if scale is None else F.relu(x * scale.view(1, -1, 1, 1).to(x.dtype) + bias.view(1, -1, 1, 1).to(x.dtype))
    y = F.conv2d(inp, w, padding=w.shape[-1] // 2)
    yf = y.float()
    return y, yf.sum((0, 2, 3)), yf.pow(2).sum((0, 2, 3))


def _unfused_backward(dy, w, x, mean, invstd, gamma, beta):
    """dgrad, the recomputed BN-apply's ReLU mask, BN's two sums and the input-gradient pass as PyTorch ops."""
    view = (1, -1, 1, 1)
    dgrad = torch.ops.aten.convolution_backward(
        dy, x, w, None, [1, 1], [w.shape[-1] // 2] * 2, [1, 1], False, [0, 0], 1, [True, False, False]
    )[0]
    xhat = (x.float() - mean.view(view)) * invstd.view(view)
    d_act = dgrad.float() * (xhat * gamma.view(view) + beta.view(view) > 0)
    dbeta, dgamma = d_act.sum((0, 2, 3)), (d_act * xhat).sum((0, 2, 3))
    count = x.numel() // x.shape[1]
    dx = (gamma * invstd).view(view) * (d_act - dbeta.view(view) / count - xhat * dgamma.view(view) / count)
    return dx.to(x.dtype), dgamma, dbeta


def probe_backward(n: int, c: int, size: int, dtype: torch.dtype) -> dict:
    row = {"n": n, "c": c, "size": size, "dtype": str(dtype).replace("torch.", ""), "prologue": "backward"}
    row["support"] = cudnn_fused.dgrad_support((n, c, size, size), (c, c, 3, 3), dtype) or "yes"
    if row["support"] != "yes":
        return row
    cl = torch.channels_last
    x = torch.randn(n, c, size, size, device="cuda", dtype=dtype).to(memory_format=cl)
    dy = torch.randn(n, c, size, size, device="cuda", dtype=dtype).to(memory_format=cl)
    w = (torch.randn(c, c, 3, 3, device="cuda", dtype=dtype) * 0.05).to(memory_format=cl)
    mean, invstd = x.float().mean((0, 2, 3)), torch.rsqrt(x.float().var((0, 2, 3)) + 1e-5)
    gamma, beta = torch.rand(c, device="cuda") + 0.5, torch.randn(c, device="cuda") * 0.1

    def fused():
        out = cudnn_fused.dgrad_drelu_dbn(dy, w, x, mean, invstd, gamma, beta)
        return out.dx(x)

    row["fused_us"] = _time(fused)
    row["unfused_us"] = _time(lambda: _unfused_backward(dy, w, x, mean, invstd, gamma, beta))
    row["conv_only_us"] = _time(
        lambda: torch.ops.aten.convolution_backward(
            dy, x, w, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1, [True, False, False]
        )
    )
    row["speedup"] = row["unfused_us"] / row["fused_us"]
    return row


def probe_one(n: int, c: int, size: int, dtype: torch.dtype, prologue: bool) -> dict:
    row = {"n": n, "c": c, "size": size, "dtype": str(dtype).replace("torch.", ""), "prologue": prologue}
    row["support"] = cudnn_fused.support((n, c, size, size), (c, c, 3, 3), dtype, prologue=prologue) or "yes"
    if row["support"] != "yes":
        return row
    x = torch.randn(n, c, size, size, device="cuda", dtype=dtype).to(memory_format=torch.channels_last)
    w = torch.randn(c, c, 3, 3, device="cuda", dtype=dtype).to(memory_format=torch.channels_last) * 0.05
    scale = torch.rand(c, device="cuda") + 0.5 if prologue else None
    bias = torch.randn(c, device="cuda") * 0.1 if prologue else None
    row["fused_us"] = _time(lambda: cudnn_fused.conv_genstats(x, w, scale, bias))
    row["unfused_us"] = _time(lambda: _unfused(x, w, scale, bias))
    row["conv_only_us"] = _time(lambda: F.conv2d(x, w, padding=1))
    row["speedup"] = row["unfused_us"] / row["fused_us"]
    return row


def main(out: str) -> None:
    os.makedirs(out, exist_ok=True)
    rows = []
    for name, (n, c, size) in SHAPES.items():
        for dtype in (torch.float16, torch.bfloat16):
            for probe, extra in ((probe_one, (False,)), (probe_one, (True,)), (probe_backward, ())):
                try:
                    row = {"shape": name, **probe(n, c, size, dtype, *extra)}
                except Exception as error:  # one failing pattern must not cost the session the others
                    row = {"shape": name, "dtype": str(dtype), "support": f"{type(error).__name__}: {error}"[:300]}
                rows.append(row)
                print(json.dumps(row), flush=True)
    device = torch.cuda.get_device_name()
    with open(os.path.join(out, "cudnn_probe.json"), "w") as f:
        json.dump({"device": device, "torch": torch.__version__, "rows": rows}, f, indent=1)
    lines = [
        f"cuDNN fused conv graphs on {device} (torch {torch.__version__})",
        "",
        "| shape | dtype | pattern (prologue) | support | fused us | unfused us | conv only us | speedup |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        timing = [f"{r[k]:.1f}" if k in r else "" for k in ("fused_us", "unfused_us", "conv_only_us", "speedup")]
        lines.append(
            f"| {r['shape']} | {r['dtype']} | {r.get('prologue', '')} | {r['support'][:60]} | "
            + " | ".join(timing)
            + " |"
        )
    with open(os.path.join(out, "cudnn_probe.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    if not (torch.cuda.is_available() and cudnn_fused.available()):
        sys.exit("cudnn_probe: needs a GPU and a build with the cudnn-frontend headers (benchmarks/gpu_session.sh)")
    main(sys.argv[1] if len(sys.argv) > 1 else "cudnn_probe")
