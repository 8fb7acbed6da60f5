"""benchmarks/results_file.py: a partial benchmark run replaces the rows it re-measured and keeps the rest;
a results file from another setup is moved aside, never overwritten."""

import importlib.util
import json
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
_spec = importlib.util.spec_from_file_location("results_file", BENCHMARKS / "results_file.py")
results_file = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(results_file)


def _payload(date: str, command: str, records: list[dict], torch_version: str = "2.13.0") -> dict:
    return {
        "date": date,
        "command": command,
        "mode": "quick",
        "device": "cpu",
        "cpu": "Xeon",
        "torch": torch_version,
        "threads": 2,
        "matmul_peak_gflops": {"torch.float32": 100.0},
        "copy_bandwidth_gbs": 30.0,
        "records": records,
    }


def _record(shape: str, ms: float) -> dict:
    return {"kind": "conv", "shape": shape, "dims": [1, 2], "dtype": "float32", "variant": "eager", "min_ms": ms}


def test_a_partial_run_keeps_the_rows_it_did_not_measure(tmp_path):
    results_file.write_results(
        str(tmp_path), "cpu", _payload("2026-11-01", "pytest benchmarks/", [_record("a", 1.0), _record("b", 2.0)])
    )
    results_file.write_results(
        str(tmp_path), "cpu", _payload("2026-11-02", "pytest -k b", [_record("b", 3.0), _record("c", 4.0)])
    )
    rows = {r["shape"]: r for r in json.loads((tmp_path / "cpu.json").read_text())["records"]}
    assert {s: r["min_ms"] for s, r in rows.items()} == {"a": 1.0, "b": 3.0, "c": 4.0}
    assert (rows["a"]["date"], rows["a"]["command"]) == ("2026-11-01", "pytest benchmarks/")
    assert (rows["b"]["date"], rows["c"]["command"]) == ("2026-11-02", "pytest -k b")
    assert list(tmp_path.iterdir()) == [tmp_path / "cpu.json"]


def test_a_file_from_another_setup_moves_aside(tmp_path):
    results_file.write_results(str(tmp_path), "cpu", _payload("2026-11-01", "old", [_record("a", 1.0)], "2.11.0"))
    results_file.write_results(str(tmp_path), "cpu", _payload("2026-11-02", "new", [_record("b", 2.0)]))
    assert [r["shape"] for r in json.loads((tmp_path / "cpu.json").read_text())["records"]] == ["b"]
    aside = json.loads((tmp_path / "cpu.2026-11-01.json").read_text())
    assert [r["shape"] for r in aside["records"]] == ["a"] and aside["torch"] == "2.11.0"
