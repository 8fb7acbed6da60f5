"""Measured ``auto`` (pnnh_kernels.set_auto_benchmark, backends/measured.py): the first call of a signature
times every backend that can compute it and keeps the fastest; trials leave the caller's tensors alone;
nothing is timed while torch.compile traces; a backend whose trial fails is left out."""

import os
import subprocess
import sys
import time

import pytest
import torch

import pnnh_kernels as pk
from pnnh_kernels.backends import measured, registry
from pnnh_kernels.backends.unfused import EagerBackend


class _FakeFused(EagerBackend):
    """Eager's block under another name, entered in auto's fused candidates; optionally slow or broken."""

    fused = True
    device_types = ("cpu",)
    priority = 1

    def __init__(self, name: str, delay: float = 0.0, broken: bool = False) -> None:
        self.name, self.delay, self.broken, self.calls = name, delay, broken, 0

    def conv2d(self, x, weights, norms, config, training):
        self.calls += 1
        if self.broken:
            raise RuntimeError("this kernel does not compile")
        time.sleep(self.delay)
        if self.delay:  # slow under any load: it also computes eager's block twice more (a loaded host
            for _ in range(2):  # stretches eager's own step past a fixed delay)
                super().conv2d(x, weights, norms, config, training)
        return super().conv2d(x, weights, norms, config, training)


@pytest.fixture
def benchmarking(monkeypatch):
    monkeypatch.setattr(measured, "_enabled", True)
    monkeypatch.setattr(measured, "_choices", {})
    monkeypatch.setattr(measured, "_buckets_timed", {})
    return monkeypatch


def _fake(monkeypatch, *args, **kwargs) -> _FakeFused:
    backend = _FakeFused(*args, **kwargs)
    monkeypatch.setitem(registry._registry, backend.name, backend)
    return backend


def _block_and_input(shape=(4, 8, 6, 6)):
    torch.manual_seed(0)
    return pk.PNNHConv2d(shape[1]).train(), torch.randn(*shape, requires_grad=True)


def test_the_fastest_trial_wins_and_is_kept_for_its_signature(benchmarking):
    slow = _fake(benchmarking, "slow_test", delay=0.02)
    block, x = _block_and_input()
    block(x).sum().backward()
    (choice,) = measured.measured_choices().values()
    assert choice.backend != "slow_test" and choice.seconds["slow_test"] >= 0.02
    assert {"slow_test", "eager"} <= set(choice.seconds)
    calls = slow.calls
    block(x).sum().backward()  # the same signature: no new trials
    assert slow.calls == calls and len(measured.measured_choices()) == 1
    block(torch.randn(2, 8, 5, 5)).sum().backward()  # a new shape is measured on its own
    assert len(measured.measured_choices()) == 2 and slow.calls > calls


def test_the_choice_follows_the_timings(benchmarking):
    _fake(benchmarking, "quick_test")
    timings = {"quick_test": 1.0, "eager": 3.0, "cpu": 2.0}
    benchmarking.setattr(measured, "_best_seconds", lambda step, device: timings[_current[0]])
    _current = [""]
    real_trial = measured._trial_step

    def trial(backend, *args):
        _current[0] = backend.name
        return real_trial(backend, *args)

    benchmarking.setattr(measured, "_trial_step", trial)
    block, x = _block_and_input()
    block(x)
    (choice,) = measured.measured_choices().values()
    assert choice.backend == "quick_test"


def test_trials_leave_the_callers_tensors_alone(benchmarking):
    """Outputs, gradients and running statistics as if the chosen backend had been named."""
    block, x = _block_and_input()
    named = pk.PNNHConv2d(8).train()
    named.load_state_dict(block.state_dict())
    y = block(x)
    assert all(p.grad is None for p in block.parameters()) and x.grad is None
    named.backend = measured.measured_choices()[next(iter(measured.measured_choices()))].backend
    x2 = x.detach().clone().requires_grad_()
    y2 = named(x2)
    torch.testing.assert_close(y, y2)
    for (name, b), (_, b2) in zip(block.named_buffers(), named.named_buffers()):
        torch.testing.assert_close(b, b2, msg=name)
    y.sum().backward()
    y2.sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)


def test_a_failed_trial_rules_the_backend_out(benchmarking):
    _fake(benchmarking, "broken_test", broken=True)
    block, x = _block_and_input()
    block(x).sum().backward()
    (choice,) = measured.measured_choices().values()
    assert choice.backend != "broken_test"
    assert "does not compile" in choice.failures["broken_test"]


def test_nothing_is_timed_while_torch_compile_traces(benchmarking):
    def refuse(*args, **kwargs):
        raise AssertionError("a trial ran while torch.compile traced")

    benchmarking.setattr(measured, "measure", refuse)
    block, x = _block_and_input()
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    compiled(x).sum().backward()
    assert measured.measured_choices() == {}


def test_off_by_default_and_on_through_the_environment(tmp_path):
    code = "import pnnh_kernels.backends.measured as m; print(m.auto_benchmark_enabled())"
    env = {k: v for k, v in os.environ.items() if k != "PNNH_AUTO_BENCHMARK"}
    # cwd: the installed package (from the repository root, -c would import the source tree)
    off = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True, cwd=tmp_path
    )
    on = subprocess.run(
        [sys.executable, "-c", code],
        env={**env, "PNNH_AUTO_BENCHMARK": "1"},
        capture_output=True,
        text=True,
        check=True,
        cwd=tmp_path,
    )
    assert (off.stdout.strip(), on.stdout.strip()) == ("False", "True")


def test_sizes_within_a_power_of_two_share_one_measurement(benchmarking):
    """A varying-shape workload (sequence lengths, a last batch) times each size bucket once, not each size."""
    slow = _fake(benchmarking, "slow_test")
    block, _ = _block_and_input()
    for n, side in [(5, 6), (6, 7), (8, 8), (7, 5)]:  # batch 5-8, maps 5-8: one bucket
        block(torch.randn(n, 8, side, side, requires_grad=True)).sum().backward()
    assert len(measured.measured_choices()) == 1
    calls = slow.calls
    block(torch.randn(9, 8, 6, 6, requires_grad=True)).sum().backward()  # batch 9: the next bucket
    assert len(measured.measured_choices()) == 2 and slow.calls > calls


def test_a_block_times_a_bounded_number_of_buckets(benchmarking):
    """Past MAX_BUCKETS_PER_BLOCK new buckets, a block takes the static choice without a trial."""
    benchmarking.setattr(measured, "MAX_BUCKETS_PER_BLOCK", 2)
    slow = _fake(benchmarking, "slow_test")
    block, _ = _block_and_input()
    for n in (1, 2, 4, 8):
        block(torch.randn(n, 8, 6, 6, requires_grad=True)).sum().backward()
    assert len(measured.measured_choices()) == 2
    calls = slow.calls
    block(torch.randn(16, 8, 6, 6, requires_grad=True)).sum().backward()
    assert slow.calls == calls + 1  # run once as the static choice (priority 1), not timed
