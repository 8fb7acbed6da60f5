"""A benchmark run's results file, ``results/<device>.json``, merged with the one already there.

A run often measures part of the suite (``-k``, ``--bench-shape``): the rows it re-measured replace their
old versions, the others stay, each record stamped with the date and command of the run that measured it.
A file from another machine, torch version or mode (smoke, quick, full) is never merged into nor lost: it
moves aside as ``<device>.<its date>.json`` (the report renders every file in the folder).
"""

from __future__ import annotations

import json
import os

#: what must agree for two runs' rows to share one file
_SAME_SETUP = ("device", "cpu", "torch", "threads", "mode")


def record_key(record: dict) -> tuple:
    """What a record measured (its numbers aside): a later run's record with this key replaces it."""
    fields = ("kind", "shape", "dtype", "variant", "layout", "pass_", "block")
    return (*(record.get(f) for f in fields), tuple(record.get("dims") or ()))


def _stamped(records: list[dict], date: str, command: str) -> list[dict]:
    return [{"date": date, "command": command, **r} for r in records]


def _free_name(folder: str, slug: str, date: str) -> str:
    path, n = os.path.join(folder, f"{slug}.{date}.json"), 1
    while os.path.exists(path):
        n += 1
        path = os.path.join(folder, f"{slug}.{date}-{n}.json")
    return path


def write_results(folder: str, slug: str, payload: dict) -> str:
    """Write ``payload`` (this run's) as ``folder/<slug>.json``, merged with a same-setup file there;
    returns the path written."""
    path = os.path.join(folder, f"{slug}.json")
    records = _stamped(payload["records"], payload["date"], payload["command"])
    if os.path.isfile(path):
        with open(path) as f:
            old = json.load(f)
        if all(old.get(k) == payload.get(k) for k in _SAME_SETUP):
            measured = {record_key(r) for r in records}
            kept = [r for r in _stamped(old["records"], old["date"], old["command"]) if record_key(r) not in measured]
            records = kept + records
            payload = {**payload, "matmul_peak_gflops": {**old["matmul_peak_gflops"], **payload["matmul_peak_gflops"]}}
            if payload.get("copy_bandwidth_gbs") is None:
                payload["copy_bandwidth_gbs"] = old.get("copy_bandwidth_gbs")
        else:
            os.replace(path, _free_name(folder, slug, old.get("date", "undated")))
    with open(path, "w") as f:
        json.dump({**payload, "records": records}, f, indent=1)
    return path
