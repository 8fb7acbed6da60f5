"""Render benchmarks/RESULTS.md from the JSON files of the benchmark runs (one per device)."""

from __future__ import annotations

import glob
import json
import os
from collections import Counter, defaultdict

TARGETS_GPU = {"eager": 1.5, "compile": 1.2}  # the issue's targets for the fused backends (bf16, fwd+bwd)
TARGET_CPU = 1.2  # the C++ backend against eager, fp32 fwd+bwd on CPU (conv and linear blocks)
TARGET_MEMORY = 0.7  # saved activations of the fused backends against eager


def _ms(r) -> float:
    """The time ratios use: the best round where recorded. Other tenants of a shared host only ever add
    time, so the minimum is the steadier estimate of what a variant costs (the median is shown too)."""
    return r.get("min_ms", r["median_ms"])


def _pct(v) -> str:
    return "" if v is None else f"{100 * v:.1f}%"


def _fmt(v, spec=".2f"):
    return "" if v is None else format(v, spec)


def _layout(r) -> str:
    return r.get("layout", "nchw") if r["kind"] == "conv" else "rows"


def _index(records):
    table = defaultdict(dict)
    for r in records:
        if r["kind"] in ("conv", "linear"):
            table[(r["kind"], r["shape"], r["dtype"], _layout(r), r["pass_"])][r["variant"]] = r
    return table


def _best_layout(records, kind, shape, dtype, pass_, variant):
    """The fastest record of a variant over the input layouts measured (None if it has none)."""
    rows = [
        r
        for r in records
        if (r["kind"], r["shape"], r["dtype"], r["pass_"], r["variant"]) == (kind, shape, dtype, pass_, variant)
    ]
    return min(rows, key=_ms, default=None)


def _block_tables(payload) -> list[str]:
    lines = []
    table = _index(payload["records"])
    for (kind, shape, dtype, layout, pass_), variants in sorted(table.items()):
        base = variants.get("eager")
        comp = variants.get("compile")
        dims = "x".join(map(str, next(iter(variants.values()))["dims"]))
        where = f"{dtype}, {layout}" if kind == "conv" else dtype
        lines += [f"#### {kind} block, {shape} ({dims}), {where}, {pass_}", ""]
        first = variants.get("eager") or next(iter(variants.values()))
        if first.get("traffic_mb") is not None:
            lines += [
                f"Roofline: {first['traffic_mb']:.1f} MB of compulsory traffic, {first['flop_per_byte']:.1f} FLOP/byte for the PNNH block (`bench_utils._block_traffic`; the `residual` row is rated against its own block's).",
                "",
            ]
        lines += [
            "| variant | median ms | min ms | vs eager | vs compile | saved act. MB | mem vs eager | GFLOP/s | of matmul peak | of roofline |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for name, r in sorted(variants.items(), key=lambda kv: _ms(kv[1])):
            speed = _ms(base) / _ms(r) if base else None
            vs_comp = _ms(comp) / _ms(r) if comp else None
            mem = r.get("saved_activation_mb")
            mem_ratio = (
                mem / base["saved_activation_mb"]
                if (mem is not None and base and base.get("saved_activation_mb"))
                else None
            )
            lines.append(
                f"| {name} | {r['median_ms']:.2f} | {_fmt(r.get('min_ms'))} | {_fmt(speed)}x | {_fmt(vs_comp)}{'x' if vs_comp else ''} | "
                f"{_fmt(mem, '.1f')} | {_fmt(mem_ratio)}{'x' if mem_ratio else ''} | {r['gflops']:.1f} | {100 * r['peak_fraction']:.1f}% | "
                f"{_pct(r.get('roofline_fraction'))} |"
            )
        lines.append("")
    return lines


def _head_to_head(payload) -> dict:
    """(shape, dtype, layout, variant) -> the interleaved block record (see test_head_to_head.py)."""
    return {
        (r["shape"], r["dtype"], r["layout"], r["variant"]): r
        for r in payload["records"]
        if r["kind"] == "head_to_head" and r.get("block") != "model"
    }


def _eager_layout(records, shape, dtype) -> str:
    """Eager's faster input layout for a conv shape: "the fastest plain-PyTorch form" of the baseline."""
    best = _best_layout(records, "conv", shape, dtype, "fwd+bwd", "eager")
    if best is not None:
        return _layout(best)
    rows = [r for r in records if r["kind"] == "head_to_head" and (r["shape"], r["dtype"]) == (shape, dtype)]
    return min(rows, key=lambda r: r["eager_median_ms"])["layout"] if rows else "nchw"


def _head_to_head_table(payload) -> list[str]:
    rows = sorted(
        (r for r in payload["records"] if r["kind"] == "head_to_head"),
        key=lambda r: (r.get("block") == "model", r["shape"], r["layout"], r["variant"]),
    )
    if not rows:
        return []
    lines = [
        "### Head to head (interleaved steps)",
        "",
        "Each round times one step of eager and one of the backend back to back (alternating which goes first):",
        "forward+backward for a block, a training step for a model, an inference call for a `deploy:` row;",
        "the ratio is the median over rounds of eager's time over the backend's, with its quartiles.",
        "",
        "| shape (block, or model: a training step) | dtype | layout | backend | rounds | eager median ms | backend median ms | ratio (median) | quartiles |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        q1, _, q3 = r["ratio_quartiles"]
        lines.append(
            f"| {r['shape']} {'x'.join(map(str, r['dims']))} | {r['dtype']} | {r['layout']} | {r['variant']} | {r['pairs']} | "
            f"{r['eager_median_ms']:.2f} | {r['median_ms']:.2f} | {r['ratio_median']:.2f}x | {q1:.2f}-{q3:.2f} |"
        )
    return [*lines, ""]


def _targets(payload) -> list[str]:
    table = _index(payload["records"])
    h2h = _head_to_head(payload)
    gpu = payload["device"].find("CUDA") >= 0
    lines = ["### Targets", ""]
    rows = []
    best_rows = set()
    for (kind, shape, dtype, layout, pass_), variants in sorted(table.items()):
        if pass_ != "fwd+bwd" or "eager" not in variants:
            continue
        label = f"{kind} {shape} {dtype}" + (f" {layout}" if kind == "conv" else "")
        for name, r in variants.items():
            if name in ("eager", "compile", "reference", "residual"):
                continue
            if gpu and dtype == "bfloat16":
                for base, goal in TARGETS_GPU.items():
                    if base in variants:
                        ratio = _ms(variants[base]) / _ms(r)
                        rows.append(
                            f"| {label} | {name} vs {base} | {ratio:.2f}x | >= {goal}x | {'met' if ratio >= goal else 'MISSED'} |"
                        )
            if not gpu and dtype == "float32":
                pair = h2h.get((shape, dtype, layout, name))
                ratio, how = (
                    (pair["ratio_median"], "interleaved") if pair else (_ms(variants["eager"]) / _ms(r), "best rounds")
                )
                rows.append(
                    f"| {label} | {name} vs eager ({how}) | {ratio:.2f}x | >= {TARGET_CPU}x | {'met' if ratio >= TARGET_CPU else 'MISSED'} |"
                )
                if kind == "conv":
                    best_rows.add((kind, shape, dtype, pass_, name))
            mem, base_mem = r.get("saved_activation_mb"), variants["eager"].get("saved_activation_mb")
            if mem is not None and base_mem:
                ratio = mem / base_mem
                rows.append(
                    f"| {label} | {name} saved activations vs eager | {ratio:.2f}x | <= {TARGET_MEMORY}x | {'met' if ratio <= TARGET_MEMORY else 'MISSED'} |"
                )
    for kind, shape, dtype, _pass, name in sorted(best_rows):  # the strict reading: against eager's faster layout
        layout = _eager_layout(payload["records"], shape, dtype)
        pair = h2h.get((shape, dtype, layout, name))
        if pair is None:
            continue
        ratio = pair["ratio_median"]
        rows.append(
            f"| {kind} {shape} {dtype}, at eager's faster layout | {name} vs eager, both {layout} (interleaved) | "
            f"{ratio:.2f}x | >= {TARGET_CPU}x | {'met' if ratio >= TARGET_CPU else 'MISSED'} |"
        )
    if not rows:
        return [*lines, "No fused backend was measured in this run.", ""]
    return [*lines, "| shape | comparison | measured | target | |", "|---|---|---|---|---|", *rows, ""]


def _models(payload) -> list[str]:
    rows = [r for r in payload["records"] if r["kind"] == "model"]
    if not rows:
        return []
    lines = [
        "### Whole-model training step",
        "",
        "| model [backend] | input | parameters | median step ms | best step ms | images/s (best) | saved act. MB |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (r["shape"], r["variant"])):
        lines.append(
            f"| {r['variant']} | {'x'.join(map(str, r['dims']))} | {r['parameters']:,} | {r['median_ms']:.1f} | "
            f"{_fmt(r.get('min_ms'), '.1f')} | {r['images_per_s']:.1f} | {r['saved_activation_mb']:.1f} |"
        )
    return [*lines, ""]


def _deploy(payload) -> list[str]:
    rows = [r for r in payload["records"] if r["kind"] == "deploy"]
    if not rows:
        return []
    lines = [
        "### Inference after deployment (`-k deploy`)",
        "",
        "| input | model [form, runtime] | parameters | best ms | images/s | vs ResNet-56 eager | vs ResNet-56 "
        "folded, eager | peak MB |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def ratio(r, baseline_variant):
        base = next((b for b in rows if (b["variant"], b["shape"]) == (baseline_variant, r["shape"])), None)
        return f"{r['images_per_s'] / base['images_per_s']:.2f}x" if base else ""

    for r in sorted(rows, key=lambda r: (r["dims"][0], r["variant"])):
        lines.append(
            f"| {'x'.join(map(str, r['dims']))} | {r['variant']} | {r['parameters']:,} | {r['min_ms']:.2f} | "
            f"{r['images_per_s']:.0f} | {ratio(r, 'resnet56 [trained, eager]')} | "
            f"{ratio(r, 'resnet56 [fast, eager]')} | {_fmt(r.get('peak_mb'), '.0f')} |"
        )
    return [*lines, ""]


def _runs(payload) -> str:
    """The runs a results file's rows come from: date, command, row count (results_file.py stamps rows)."""
    runs = Counter((r.get("date", payload["date"]), r.get("command", payload["command"])) for r in payload["records"])
    return "; ".join(f"{date} `{command}` ({n} rows)" for (date, command), n in sorted(runs.items()))


def render_results(results_dir: str, out_path: str) -> None:
    parts = [
        "# Benchmark results",
        "",
        "Generated by `benchmarks/report.py` from `benchmarks/results/*.json`; every ratio compares numbers",
        "measured in the same run, from each variant's best round (`min ms`; the median is shown beside it).",
        "`eager` is the algebraic block in plain PyTorch (oneDNN/cuDNN conv +",
        "batch norm + ReLU), `compile` is `torch.compile` of it, `reference` the literal block, `residual` a",
        "ResNet basic block (or ViT MLP) of the same width. Saved activations: bytes autograd keeps between",
        "forward and backward. FLOP rates count the block's GEMMs (backward = 2x forward); the peak is a",
        "square matmul measured in the same run. Roofline: the attainable rate is min(matmul peak, FLOP/byte x",
        "copy bandwidth), with the bytes the fused dataflow must move and a large copy's bandwidth measured in",
        "the same run; `of roofline` is the achieved rate (median, like the other rate columns) over it.",
        "",
    ]
    notes = os.path.join(results_dir, "NOTES.md")
    if os.path.isfile(notes):
        with open(notes) as f:
            parts += [f.read().rstrip(), ""]
    for path in sorted(glob.glob(os.path.join(results_dir, "*.json"))):
        with open(path) as f:
            payload = json.load(f)
        parts += [
            f"## {payload['device']} ({payload['cpu']})",
            "",
            f"- {payload['mode']} set; rows measured by: " + _runs(payload),
            f"- torch {payload['torch']}, {payload['threads']} threads; matmul peak: "
            + ", ".join(f"{k.replace('torch.', '')} {v:.0f} GFLOP/s" for k, v in payload["matmul_peak_gflops"].items())
            + (
                f"; copy bandwidth {payload['copy_bandwidth_gbs']:.0f} GB/s"
                if payload.get("copy_bandwidth_gbs")
                else ""
            ),
            "",
        ]
        parts += (
            _targets(payload)
            + _head_to_head_table(payload)
            + _models(payload)
            + _deploy(payload)
            + ["### Blocks", ""]
            + _block_tables(payload)
        )
    with open(out_path, "w") as f:
        f.write("\n".join(parts).rstrip() + "\n")
