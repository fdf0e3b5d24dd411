"""Stage 6: one 512×512 3×3 block term decomposition on the GPU at G = 32, 16, 1, beside the CPU.

gross.decompose.btd on bench/decompose.py's random weight (the benchmark's own), to convergence
on the device: seconds, relative error, passes. The CPU figure is measured in the same run on
the same weight: a few passes with every core, as seconds per pass and that times the device's
passes (bench/RESULTS.md has the full CPU runs on the project's 2-core machine).
"""
from __future__ import annotations

import os
import time

import torch

from decompose import make_weight
from gross.decompose import btd
from kernels import sync

TITLE = "6. Decomposition on the GPU (gross.decompose.btd, 512×512 3×3)"
# Cheapest first: 16 blocks, 32, then 512 blocks of rank 1 (G = 1).
GROUP_SIZES = (32, 16, 1)
CPU_PASSES = 2


def _warm_up(weight, device):
    """The device's linear-algebra libraries load on their first use: not in the timings."""
    btd(weight[:8, :8].to(device), 4, (8, 8), max_iter=2)
    return {}


def _one(weight, G, device, max_iter):
    c = weight.shape[0]
    start = time.perf_counter()
    res = btd(weight.to(device), G, (c, c), max_iter=max_iter)
    sync(device)
    seconds = time.perf_counter() - start
    torch.set_num_threads(os.cpu_count() or 1)
    start = time.perf_counter()
    btd(weight, G, (c, c), max_iter=CPU_PASSES, tol=0.0)
    cpu_per_pass = (time.perf_counter() - start) / CPU_PASSES
    return {"G": G, "device_s": seconds, "rel_error": res.rel_error, "passes": res.iterations,
            "cpu_s_per_pass": cpu_per_pass, "cpu_threads": torch.get_num_threads(),
            "cpu_estimate_s": cpu_per_pass * res.iterations}


def run(ctx):
    """Decompose the weight on the device at each group size, with the CPU's pass time beside."""
    c, sizes, max_iter = (8, (4, 2, 1), 5) if ctx.quick else (512, GROUP_SIZES, 500)
    weight = make_weight(c, c, "random", seed=c * 1000 + c)
    ctx.set("shape", f"{c}×{c}×3×3, at most {max_iter} passes")
    ctx.item("warm-up", lambda: _warm_up(weight, ctx.device), estimate_s=0)
    ctx.plan(f"G={G}" for G in sizes)
    for G in sizes:
        ctx.item(f"G={G}", lambda: _one(weight, G, ctx.device, max_iter), estimate_s=0)


def render(data):
    """The table of device seconds, errors, passes and the CPU estimate."""
    lines = [f"Weight {data.get('shape', '?')} (random, bench/decompose.py), tol 1e-5.",
             "", "| G | device s | rel. error | passes | CPU s/pass (threads) | CPU estimate s | ×CPU |",
             "|---|---|---|---|---|---|---|"]
    for key, row in data.get("items", {}).items():
        if key == "warm-up":
            continue
        if row["status"] != "ok":
            lines.append(f"| {key} | {row['status']}: {row.get('error', row.get('reason', ''))} "
                         "| | | | | |")
            continue
        lines.append(f"| {row['G']} | {row['device_s']:.1f} | {row['rel_error']:.6f} | "
                     f"{row['passes']} | {row['cpu_s_per_pass']:.3f} ({row['cpu_threads']}) | "
                     f"{row['cpu_estimate_s']:.1f} | {row['cpu_estimate_s'] / row['device_s']:.1f}× |")
    return "\n".join(lines)


def summary(data):
    """One line: seconds, error and speed-up over the CPU per group size."""
    rows = [r for k, r in data.get("items", {}).items() if k != "warm-up" and r["status"] == "ok"]
    return "; ".join(f"G={r['G']} {r['device_s']:.1f} s (err {r['rel_error']:.4f}, "
                     f"{r['cpu_estimate_s'] / r['device_s']:.1f}× CPU)" for r in rows) or "nothing ran"
