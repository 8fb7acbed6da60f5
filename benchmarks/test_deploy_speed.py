"""Inference after deployment (`pytest benchmarks/ -k deploy`): images/s of ResNet-56, PNNH-56 as trained (eval,
`auto`) and PNNH-56 / slim PNNH-56 reparameterized in each form (docs/DEPLOY.md), in PyTorch eager (channels_last)
and in onnxruntime (float32, and int8 after static quantization); batch 1 and 64, 32x32. Each variant's best of
its rounds; the report divides by ResNet-56's eager row of the same run. Peak memory: each variant again in a
fresh process (benchmarks/peak_memory.py), from building the net or session to the end of two inference calls."""

from __future__ import annotations

import os
import time
from typing import Callable, Optional

import pytest
import torch
from deployed_nets import deployed_model, eager_call
from interleave import interleave
from peak_memory import peak_inference_mb

# (model, how it runs): "trained" is the net as trained (eval, `auto`), the forms are reparameterized
VARIANTS = [
    ("resnet56", "trained"),
    ("resnet56", "fast"),  # its batch norms folded: ResNet-56's fastest eager form
    ("pnnh_resnet56", "trained"),
    ("pnnh_resnet56", "fast"),
    ("pnnh_resnet56", "plain"),
    ("pnnh_slim_resnet56", "trained"),
    ("pnnh_slim_resnet56", "fast"),
    ("pnnh_slim_resnet56", "plain"),
]
RUNTIMES = ["eager", "onnxruntime", "onnxruntime-int8"]
#: torch.compile (inductor) of the eager form, the other baseline of plain PyTorch: ResNet-56 and the fast forms
#: (the plain form is the slowest float32 form everywhere), timed last, after every other row
COMPILED = [("resnet56", "trained"), ("resnet56", "fast"), ("pnnh_resnet56", "fast"), ("pnnh_slim_resnet56", "fast")]


def _onnx_file(model: torch.nn.Module, x: torch.Tensor, path, int8: bool) -> str:
    """The model exported to ONNX (and quantized to int8 when asked): the file's path."""
    pytest.importorskip("onnxruntime", reason="the deploy extra")
    pytest.importorskip("onnxscript")
    from pnnh_kernels.train.export import _quantize_file, _quiet_exporter

    with _quiet_exporter():
        torch.onnx.export(model, (x,), dynamo=True).save(str(path))
    if int8:
        _quantize_file(str(path), str(path) + ".int8", [torch.randn_like(x) for _ in range(4)])
        path = str(path) + ".int8"
    return str(path)


def _best_seconds(run: Callable[[], object], rounds: int) -> float:
    run()
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


@pytest.mark.parametrize("batch", [1, 64])
@pytest.mark.parametrize("runtime", RUNTIMES)
@pytest.mark.parametrize("name, how", VARIANTS, ids=[f"{n}-{h}" for n, h in VARIANTS])
def test_deploy_inference(collector, tmp_path, name, how, runtime, batch):
    if runtime != "eager" and how == "trained" and name != "resnet56":
        pytest.skip("a net as trained runs in PyTorch; its exported form is the reparameterized one")
    if runtime != "eager" and name == "resnet56" and how != "trained":
        pytest.skip("onnxruntime folds ResNet-56's batch norms itself: the graph of its trained row")
    _measure(collector, tmp_path, name, how, runtime, batch)


@pytest.mark.parametrize("batch", [1, 64])
@pytest.mark.parametrize("name, how", COMPILED, ids=[f"{n}-{h}" for n, h in COMPILED])
def test_deploy_inference_compiled(collector, tmp_path, name, how, batch):
    _measure(collector, tmp_path, name, how, "compile", batch)


def _measure(collector, tmp_path, name: str, how: str, runtime: str, batch: int) -> None:
    """Time one deployed variant (its best of 10 rounds) and record it with its peak memory."""
    if collector.device != "cpu":
        pytest.skip("the deploy rows are CPU inference")
    smoke = collector.mode == "smoke"
    if smoke and (name, how, batch) != ("pnnh_resnet56", "fast", 1):
        pytest.skip("the smoke set times one deployed net")
    name = "pnnh_resnet8" if smoke else name  # the smoke set: a small net, the same code path
    model = deployed_model(name, how)
    x = torch.randn(batch, 3, 32, 32)
    if runtime in ("eager", "compile"):
        seconds = _best_seconds(eager_call(model, x, compiled=runtime == "compile"), 1 if smoke else 10)
        # a compiled process's peak is the compiler's own: measured for eager only
        peak = _peak_mb({"batch": batch, "model": name, "how": how}) if runtime == "eager" else None
    else:
        from pnnh_kernels.train.export import _onnx_runner

        path = _onnx_file(model, x, tmp_path / "net.onnx", int8=runtime.endswith("int8"))
        run = _onnx_runner(path)
        seconds = _best_seconds(lambda: run(x), 1 if smoke else 10)
        peak = _peak_mb({"batch": batch, "onnx": path})
    collector.add(
        kind="deploy",
        shape=f"cifar32-b{batch}",
        dims=[batch, 3, 32, 32],
        dtype="int8" if runtime.endswith("int8") else "float32",
        variant=f"{name} [{how}, {runtime}]",
        pass_="inference",
        min_ms=seconds * 1e3,
        images_per_s=batch / seconds,
        parameters=sum(p.numel() for p in model.parameters()),
        peak_mb=peak,
    )


def _peak_mb(spec: dict) -> Optional[float]:
    """Peak inference memory where Linux can reset a process's peak resident set (None elsewhere)."""
    return peak_inference_mb(spec) if os.path.exists("/proc/self/clear_refs") else None


#: The issue's targets, each timed interleaved (benchmarks/interleave.py): (baseline, candidate), each a
#: (model, how, runtime) at batch 64
TARGETS = {
    "slim_vs_resnet_eager": (("resnet56", "fast", "eager"), ("pnnh_slim_resnet56", "fast", "eager")),
    "slim_vs_resnet_onnxruntime": (
        ("resnet56", "trained", "onnxruntime"),
        ("pnnh_slim_resnet56", "fast", "onnxruntime"),
    ),
    "slim_vs_itself_trained": (("pnnh_slim_resnet56", "trained", "eager"), ("pnnh_slim_resnet56", "fast", "eager")),
    "pnnh_vs_resnet_eager": (("resnet56", "fast", "eager"), ("pnnh_resnet56", "fast", "eager")),
    "pnnh_vs_resnet_onnxruntime": (("resnet56", "trained", "onnxruntime"), ("pnnh_resnet56", "fast", "onnxruntime")),
    "pnnh_vs_itself_trained": (("pnnh_resnet56", "trained", "eager"), ("pnnh_resnet56", "fast", "eager")),
}


def _inference_call(tmp_path, name: str, how: str, runtime: str, x: torch.Tensor) -> Callable[[], object]:
    model = deployed_model(name, how)
    if runtime == "eager":
        return eager_call(model, x)
    from pnnh_kernels.train.export import _onnx_runner

    session = _onnx_runner(_onnx_file(model, x, tmp_path / f"{name}-{how}.onnx", int8=False), spinning=False)
    return lambda: session(x)


def _seconds(call: Callable[[], object]) -> Callable[[], float]:
    def timed() -> float:
        start = time.perf_counter()
        call()
        return time.perf_counter() - start

    return timed


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_deploy_targets_interleaved(collector, tmp_path, target):
    """The deploy targets of issue #28 as ratios of interleaved rounds (a drifting host moves both sides)."""
    if collector.device != "cpu":
        pytest.skip("the deploy rows are CPU inference")
    smoke = collector.mode == "smoke"
    if smoke and target != "pnnh_vs_itself_trained":
        pytest.skip("the smoke set times one pair")
    base, mine = TARGETS[target]
    if smoke:
        base, mine = ("pnnh_resnet8", *base[1:]), ("pnnh_resnet8", *mine[1:])
    batch = 2 if smoke else 64
    torch.manual_seed(0)
    x = torch.randn(batch, 3, 32, 32)
    base_call = _inference_call(tmp_path, *base, x)
    mine_call = _inference_call(tmp_path, *mine, x)
    record = dict(
        block="model",
        pass_="inference",
        shape=f"deploy: {mine[0]} [{mine[1]}] vs {base[0]} [{base[1]}] (eager column), {mine[2]}",
        dims=[batch, 3, 32, 32],
        dtype="float32",
        variant=target,
        layout="channels_last" if mine[2] == "eager" else "onnx",
    )
    interleave(collector, _seconds(base_call), _seconds(mine_call), 3 if smoke else 25, record)
