"""Stage 3: the kernel benchmark (bench/kernels.py) on a representative subset of the paper's layers.

Each network's distinct layer shapes, taken in turn across the networks (so a budget cut still
covers all five), at the smallest and largest group size, float32 and bfloat16; per backend
against PyTorch + cuDNN (`reference`) and the released approach (`naive`), with GB/s and
TFLOP/s against the copy bandwidth and matmul rate measured first in the same process.
"""
from __future__ import annotations

from dataclasses import asdict

import torch

import kernels as kb
from cases import NETS, interleaved_layers, tiny

TITLE = "3. Kernel benchmark (whole decomposed layer, per backend)"
# Timing budget per measurement (bench/kernels.py's `measure`): enough repeats for a stable
# median on the GPU, few enough that the subset fits the stage's share of the budget.
BUDGET_MS = 40.0


def _subset(quick):
    if quick:  # one tiny layer (the interpreter needs seconds per call on the CPU)
        return [tiny(interleaved_layers(NETS)[0])]
    return interleaved_layers(NETS)


def run(ctx):
    """Measure the peaks, then time the layer subset per dtype (one item per layer and dtype)."""
    device, smoke = ctx.device, ctx.device.type == "cpu"
    dtypes = ["float32"] if smoke else ["float32", "bfloat16"]
    backends = kb.backends_for(device)
    ctx.set("backends", backends)
    ctx.set("meta", {d: kb.meta_for(device, d) for d in dtypes})
    peaks = {}
    for d in dtypes:
        got = ctx.item(f"peaks {d}", lambda: dict(zip(("copy_gbps", "mm_tflops"),
                                                     kb.measure_peaks(device, getattr(torch, d)))),
                       estimate_s=0)
        peaks[d] = got if got and got["status"] == "ok" else {}
    ctx.set("peaks", peaks)
    layers = _subset(ctx.quick)
    plan = [(layer, d) for layer in layers for d in dtypes]
    ctx.plan(f"{layer.title} | {d}" for layer, d in plan)
    torch.manual_seed(0)
    for layer, d in plan:
        sizes = layer.extremes()[-1:] if smoke else layer.extremes()

        def one():
            rows = kb.bench_layer(layer, device, getattr(torch, d), backends, smoke, sizes,
                                  BUDGET_MS)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            return {"ok": all(r.ok for r in rows), "rows": [asdict(r) for r in rows]}

        ctx.item(f"{layer.title} | {d}", one)


def _rows_by_dtype(data):
    out = {}
    for key, item in data.get("items", {}).items():
        if not key.startswith("peaks ") and "rows" in item:
            out.setdefault(key.rsplit(" | ", 1)[1], []).extend(kb.Row(**r) for r in item["rows"])
    return out


def _peaks(data, dtype):
    p = data.get("peaks", {}).get(dtype, {})
    return p.get("copy_gbps", float("nan")), p.get("mm_tflops", float("nan"))


def render(data):
    """bench/kernels.py's table per dtype."""
    sections = []
    columns = data.get("backends", []) + ["triton-unfused"]
    for dtype, rows in _rows_by_dtype(data).items():
        sections.append(f"#### {dtype}\n\n"
                        + kb.render(rows, columns, _peaks(data, dtype), data["meta"][dtype]))
    failed = [f"- {key}: {item.get('error', item.get('reason', ''))}"
              for key, item in data.get("items", {}).items() if item["status"] in ("error",)]
    return "\n".join(sections + failed) or "No layer was timed."


def summary(data):
    """One line per dtype: forward+backward geometric means against PyTorch and naive."""
    parts = []
    for dtype, rows in _rows_by_dtype(data).items():
        both = [r for r in rows if r.mode == "fwd+bwd"]
        speed = {b: kb.geomean([kb.speedup(r, "reference", b) for r in both]) for b in kb.KERNELS}
        naive = kb.geomean([kb.speedup(r, "naive", "auto") for r in both])
        failed = sum(not r.ok for r in rows)
        parts.append(f"{dtype}: {len(rows) // 2} rows, fwd+bwd geomean ×PyTorch "
                     + ", ".join(f"{b} {v:.2f}" for b, v in speed.items())
                     + f", auto ×naive {naive:.2f}; {failed} rows FAIL")
    return "; ".join(parts) or "nothing timed"
