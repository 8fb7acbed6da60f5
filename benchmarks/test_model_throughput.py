"""Whole-model training throughput (images/s) and saved-activation memory: PNNH vs ResNet vs plain."""

import time

import pytest
import torch
import torch.nn.functional as F
from bench_utils import saved_activation_bytes, synchronize
from variants import fused_backends

from pnnh_kernels.backends import refusal_reason, registered_backends
from pnnh_kernels.models import create_model

# (family prefix, depth, image size, batch on cpu, batch on gpu)
SETS = {
    "cifar56": ("{}resnet56", 32, 64, 256),
    "imagenet34": ("{}resnet34", 112, 8, 64),
}


def pytest_generate_tests(metafunc):
    if "model_set" not in metafunc.fixturenames:
        return
    config = metafunc.config
    smoke, full = config.getoption("--bench-smoke"), config.getoption("--bench-full")
    sets = ["cifar56"] if not full else list(SETS)
    runs = []
    for s in sets:
        for prefix in ("", "plain_", "pnnh_"):
            backends = ["eager"] + (fused_backends() if prefix == "pnnh_" else [])
            runs += [(s, prefix, b) for b in backends]
    if smoke:
        runs = [("cifar56", "pnnh_", "eager")]
    metafunc.parametrize("model_set, prefix, backend", runs, ids=[f"{s}-{p or 'resnet_'}{b}" for s, p, b in runs])


def test_training_throughput(collector, model_set, prefix, backend):
    pattern, size, cpu_batch, gpu_batch = SETS[model_set]
    device = collector.device
    batch = 8 if collector.mode == "smoke" else (gpu_batch if device == "cuda" else cpu_batch)
    name = pattern.format(prefix)
    kwargs = {"backend": backend} if prefix == "pnnh_" else {}
    model = create_model(name, num_classes=10, **kwargs).to(device).train()
    if prefix == "pnnh_" and backend != "eager":
        block = next(m for m in model.modules() if hasattr(m, "backend"))
        x0 = torch.randn(2, block.in_channels, 4, 4, device=device)
        reason = refusal_reason(registered_backends()[backend], "conv2d", x0, block.block_weights(), block.config)
        if reason:
            pytest.skip(reason)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 10, (batch,), device=device)

    def step():
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()
    synchronize(device)
    steps = 1 if collector.mode == "smoke" else 5
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - start)
    median = sorted(times)[len(times) // 2]
    saved = saved_activation_bytes(lambda: F.cross_entropy(model(x), y))
    collector.add(
        kind="model",
        shape=model_set,
        dims=[batch, 3, size, size],
        dtype="float32",
        variant=f"{name}[{backend}]",
        pass_="train step",
        median_ms=median * 1e3,
        min_ms=min(times) * 1e3,
        images_per_s=batch / min(times),
        parameters=sum(p.numel() for p in model.parameters()),
        saved_activation_mb=saved / 2**20,
    )
