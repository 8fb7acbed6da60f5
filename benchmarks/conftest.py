"""Benchmark session: options, the measurement collector, and the results file written at the end.

    pytest benchmarks/                  quick CPU set (a few minutes)
    pytest benchmarks/ --bench-full     every shape of the issue, torch.compile everywhere
    pytest benchmarks/ --bench-smoke    one tiny shape, one round (a check that the suite runs)

Each run writes ``benchmarks/results/<device>.json`` (or ``--bench-results DIR``), merged with the rows
of earlier runs it did not re-measure (results_file.py), and re-renders ``RESULTS.md`` beside it from
every JSON file there, so CPU rows from one machine and GPU rows from another stay side by side, each
row with its own date and command.
"""

from __future__ import annotations

import datetime
import os
import sys
from typing import Optional

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

from bench_shapes import run_device, run_mode
from bench_utils import copy_bandwidth, cpu_model, device_description, matmul_peak_flops

HERE = os.path.dirname(os.path.abspath(__file__))


def pytest_addoption(parser):
    group = parser.getgroup("pnnh benchmarks")
    group.addoption("--bench-full", action="store_true", help="every shape, torch.compile on every shape")
    group.addoption("--bench-smoke", action="store_true", help="one tiny shape, one round")
    group.addoption("--bench-results", default=None, help="folder for the JSON and RESULTS.md (default: benchmarks/)")
    group.addoption(
        "--bench-dtype", action="append", default=None, help="only these dtypes (float32, bfloat16, ...); repeatable"
    )
    group.addoption(
        "--bench-layout",
        action="append",
        default=None,
        help="only these conv input layouts (nchw, channels_last); repeatable",
    )
    group.addoption(
        "--bench-shape", action="append", default=None, help="only shapes whose label starts with this; repeatable"
    )


class Collector:
    def __init__(self, config) -> None:
        self.mode = run_mode(config)
        self.device = run_device()
        self.records: list[dict] = []
        self._peaks: dict[str, float] = {}
        self._bandwidth: Optional[float] = None

    def peak(self, dtype: torch.dtype) -> float:
        key = str(dtype)
        if key not in self._peaks:
            self._peaks[key] = matmul_peak_flops(dtype, self.device, n=256 if self.mode == "smoke" else 2048)
        return self._peaks[key]

    def bandwidth(self) -> float:
        if self._bandwidth is None:
            self._bandwidth = copy_bandwidth(self.device, megabytes=16 if self.mode == "smoke" else 256)
        return self._bandwidth

    def add(self, **record) -> None:
        self.records.append(record)


def pytest_configure(config):
    config._pnnh_collector = Collector(config)


@pytest.fixture(scope="session")
def collector(request) -> Collector:
    return request.config._pnnh_collector


@pytest.fixture(scope="session")
def bench_mode(collector) -> str:
    return collector.mode


@pytest.fixture(scope="session")
def bench_device(collector) -> str:
    return collector.device


def rounds_for(mode: str, seconds_per_call: float) -> int:
    if mode == "smoke":
        return 1
    budget = 6.0 if mode == "full" else 2.0  # seconds of timing per measurement
    return int(min(30, max(5, budget / max(seconds_per_call, 1e-4))))


def pytest_sessionfinish(session, exitstatus):
    collector: Collector = session.config._pnnh_collector
    if not collector.records:
        return
    from report import render_results
    from results_file import write_results

    folder = session.config.getoption("--bench-results") or HERE
    os.makedirs(os.path.join(folder, "results"), exist_ok=True)
    device = collector.device
    slug = "cuda-" + torch.cuda.get_device_name(0).replace(" ", "_") if device == "cuda" else "cpu"
    payload = {
        "date": datetime.date.today().isoformat(),
        "command": "pytest " + " ".join(sys.argv[1:]),
        "mode": collector.mode,
        "device": device_description(device),
        "cpu": cpu_model(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "matmul_peak_gflops": {k: v / 1e9 for k, v in collector._peaks.items()},
        "copy_bandwidth_gbs": None if collector._bandwidth is None else collector._bandwidth / 1e9,
        "records": collector.records,
    }
    write_results(os.path.join(folder, "results"), slug, payload)
    render_results(os.path.join(folder, "results"), os.path.join(folder, "RESULTS.md"))
