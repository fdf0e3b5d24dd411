"""Kernel benchmark: every decomposed layer shape of the paper's networks, per backend, forward and forward+backward.

    python bench/kernels.py --device cuda --out DIR      # the GPU table (H100/H200: ~minutes)
    python bench/kernels.py --device cpu --out DIR       # CI smoke test under TRITON_INTERPRET=1

For each unique layer shape (bench/cases.py) and each group size of its series, the whole
decomposed layer (1×1 A → series core → 1×1 C + bias) is checked against backend="reference"
and then timed: naive (the released GroSS approach: expand each term by looping over its filter
groups and concatenating, then three F.conv2d), PyTorch (backend="reference": vectorised
expansion + cuDNN), triton, cuda (when built) and auto. The kernels' achieved GB/s and TFLOP/s
are given against the card's copy bandwidth and matrix-multiply rate, measured at the start of
the run. Timings: warm-up (compilation and autotuning) first, then the median of repeated runs
timed with CUDA events; inputs rotate among several sets when one set would fit in L2.
bench/gpu_check.py runs the same functions on a subset of the layers.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field

import torch

# --device cpu runs the Triton kernels in their interpreter; the flag must precede the import.
if "--device" in sys.argv and sys.argv[sys.argv.index("--device") + 1:][:1] == ["cpu"]:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import gross_kernels as gk  # noqa: E402
from cases import (NETS, call_layer, make_tensors, rel_error, runner, tolerance,  # noqa: E402
                   unique_layers)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# The library's own kernels, whose speed-ups and rates the tables give (auto: what users run).
KERNELS = ("triton", "cuda", "auto")


@dataclass
class Row:
    """Timings (ms), errors and rates (per backend) of one layer at one group size in one mode."""

    net: str
    names: list
    shape: str
    G: int
    mode: str
    S: int
    ms: dict = field(default_factory=dict)
    err: dict = field(default_factory=dict)
    ok: bool = True
    gbps: dict = field(default_factory=dict)
    tflops: dict = field(default_factory=dict)


def sync(device):
    """Wait for the device's queued work (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn, device, smoke, budget_ms=150.0):
    """Median time (ms) of fn(i) for i = 0, 1, ...: two warm-up calls, then timed repeats (CUDA events)."""
    if smoke:  # one untimed-quality run: the interpreter is for correctness, not speed
        start = time.perf_counter()
        fn(0)
        return (time.perf_counter() - start) * 1e3
    fn(0)
    fn(1)
    sync(device)
    start = time.perf_counter()
    fn(2)
    sync(device)
    estimate = max((time.perf_counter() - start) * 1e3, 1e-3)
    reps = int(min(100, max(5, budget_ms / estimate)))
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(reps)]
    for i, (begin, end) in enumerate(events):
        begin.record()
        fn(i)
        end.record()
    sync(device)
    times = sorted(b.elapsed_time(e) for b, e in events)
    return times[len(times) // 2]


def measure_peaks(device, dtype):
    """(copy GB/s counting read + write, matmul TFLOP/s at the Triton kernels' precision)."""
    if device.type != "cuda":
        return float("nan"), float("nan")
    src = torch.empty(2 ** 28, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = measure(lambda i: dst.copy_(src), device, False)
    copy_gbps = 2 * src.numel() / ms / 1e6
    a = torch.randn(8192, 8192, device=device, dtype=dtype)
    b = torch.randn(8192, 8192, device=device, dtype=dtype)
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32  # as the convs run
    try:
        ms = measure(lambda i: a @ b, device, False)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved
    return copy_gbps, 2 * 8192 ** 3 / ms / 1e9


def layer_costs(layer, G, esize):
    """(forward FLOPs, bytes of x, bytes of y) at the active G; the fewest bytes a pass moves derive from these."""
    kk = 9
    ho = (layer.hw - 1) // layer.stride + 1
    n = layer.batch
    flops = 2 * n * (layer.hw ** 2 * layer.c_in * layer.S + ho * ho * layer.T * (G * kk + layer.c_out))
    x_bytes = n * layer.c_in * layer.hw ** 2 * esize
    y_bytes = n * layer.c_out * ho * ho * esize
    return flops, x_bytes, y_bytes


def bench_layer(layer, device, dtype, backends, smoke, group_sizes=None, budget_ms=150.0):
    """Rows (forward, forward+backward) for each group size of `layer` (or those in `group_sizes`)."""
    esize = torch.finfo(dtype).bits // 8
    x_bytes = layer.batch * layer.c_in * layer.hw ** 2 * esize
    sets = 1 if smoke or x_bytes > 64 * 2 ** 20 else 4  # rotate inputs that would sit in L2
    tensors = make_tensors(layer, device, dtype, sets)
    xs, firsts, cores, lasts, bias = tensors
    rows = []
    for G in group_sizes or layer.group_sizes:
        fwd = Row(layer.net, layer.names, layer.shape, G, "fwd", layer.S)
        both = Row(layer.net, layer.names, layer.shape, G, "fwd+bwd", layer.S)
        for t in xs + firsts + cores + lasts + [bias]:
            t.requires_grad_()
        x0 = xs[0]
        checked = [x0] + [c for c, g in zip(cores, layer.group_sizes) if g <= G]
        ref_y = call_layer("reference", layer, x0, firsts, cores, lasts, bias, G)
        grad_y = torch.randn_like(ref_y)
        ref_grads = torch.autograd.grad(ref_y, checked, grad_y)
        tol = tolerance(dtype)
        for backend in backends:
            try:
                y = call_layer(backend, layer, x0, firsts, cores, lasts, bias, G)
                grads = torch.autograd.grad(y, checked, grad_y)
                fwd.err[backend] = rel_error(y, ref_y)
                both.err[backend] = max(rel_error(a, b) for a, b in zip(grads, ref_grads))
                fwd.ok &= fwd.err[backend] < tol
                both.ok &= both.err[backend] < tol
                del y, grads
                fwd.ms[backend] = measure(runner(backend, layer, tensors, G, "fwd"), device,
                                          smoke, budget_ms)
                both.ms[backend] = measure(runner(backend, layer, tensors, G, "fwd+bwd"), device,
                                           smoke, budget_ms)
            except Exception as error:  # recorded in the table, never silently dropped
                fwd.err[backend] = both.err[backend] = f"{type(error).__name__}: {error}"[:200]
                fwd.ok = both.ok = False
                print(f"[{layer.net} {layer.names[0]} G={G} {backend}] {error}", file=sys.stderr)
        try:
            _time_unfused_forward(fwd, layer, G, tensors, ref_y, device, smoke, budget_ms)
        except Exception as error:  # a Triton failure here must not lose the row
            fwd.err["triton-unfused"] = f"{type(error).__name__}: {error}"[:200]
            fwd.ok = False
        flops, xb, yb = layer_costs(layer, G, esize)
        for row, f, b in ((fwd, flops, xb + yb), (both, 3 * flops, 3 * xb + 2 * yb)):
            for name in KERNELS:
                if name in row.ms:
                    row.gbps[name] = b / row.ms[name] / 1e6
                    row.tflops[name] = f / row.ms[name] / 1e9
        rows += [fwd, both]
        del ref_y, ref_grads, grad_y
    return rows


def _time_unfused_forward(row, layer, G, tensors, ref_y, device, smoke, budget_ms):
    """Where the fused Triton forward applies, also time the three-launch Triton forward (column
    'triton-unfused'), so that the fit rule can be checked against measurements."""
    from gross_kernels.triton import bottleneck as tb

    xs, firsts, cores, lasts, bias = tensors
    if "triton" not in row.ms or not tb.fits_on_chip(layer.c_in, layer.S, layer.T, layer.c_out,
                                                       (3, 3)):
        return
    active = [i for i, g in enumerate(layer.group_sizes) if g <= G]
    with torch.no_grad():
        args = (sum(firsts[i] for i in active), cores, sum(lasts[i] for i in active), bias,
                layer.group_sizes, G, (layer.stride,) * 2, (layer.padding,) * 2,
                (layer.dilation,) * 2)
        row.err["triton-unfused"] = rel_error(tb.forward(xs[0], *args, fused=False), ref_y)
        row.ok &= row.err["triton-unfused"] < tolerance(xs[0].dtype)
        row.ms["triton-unfused"] = measure(lambda i: tb.forward(xs[i % len(xs)], *args,
                                                                fused=False), device, smoke,
                                           budget_ms)


def geomean(values):
    """Geometric mean of the positive finite values (nan if there are none)."""
    values = [v for v in values if v > 0 and math.isfinite(v)]
    return math.exp(sum(map(math.log, values)) / len(values)) if values else float("nan")


def speedup(row, base, backend):
    """How many times faster `backend` ran than `base` on this row (nan if either is missing)."""
    ms = row.ms
    return ms[base] / ms[backend] if base in ms and backend in ms else float("nan")


def _fastest_kernel(row):
    """The fastest of the library's own kernels (triton, cuda) on this row, or None."""
    timed = [b for b in ("triton", "cuda") if b in row.ms]
    return min(timed, key=row.ms.get) if timed else None


def _rates(row, peaks):
    copy_gbps, mm_tflops = peaks
    best = _fastest_kernel(row)
    if best is None:
        return "—", "—"
    return (f"{best} {row.gbps[best]:.0f} ({100 * row.gbps[best] / copy_gbps:.0f}%)",
            f"{best} {row.tflops[best]:.2f} ({100 * row.tflops[best] / mm_tflops:.0f}%)")


def render(rows, backends, peaks, meta):
    """The markdown table, geometric-mean summary rows last."""
    copy_gbps, mm_tflops = peaks
    ours = [b for b in KERNELS if b in backends]
    head = (["net", "layer", "shape", "G", "pass"] + [f"{b} ms" for b in backends]
            + [f"{b} ×PyTorch" for b in ours] + [f"{b} ×naive" for b in ours]
            + ["fastest kernel GB/s (% copy)", "TFLOP/s (% mm)", "check"])
    lines = [f"Device: {meta['device']}; dtype {meta['dtype']}; tf32 {meta['tf32']}; "
             f"torch {meta['torch']}; triton {meta['triton']}; {meta['date']}.",
             f"Measured copy bandwidth {copy_gbps:.0f} GB/s, matmul {mm_tflops:.1f} TFLOP/s. "
             "×PyTorch, ×naive: how many times faster than backend='reference' (PyTorch + cuDNN) "
             "and than the released approach.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r.net, ", ".join(r.names), r.shape, str(r.G), r.mode]
        cells += [f"{r.ms[b]:.3f}" if b in r.ms else "—" for b in backends]
        cells += [f"{speedup(r, base, b):.2f}×" for base in ("reference", "naive") for b in ours]
        cells += [*_rates(r, peaks),
                  "ok" if r.ok else "FAIL " + "; ".join(f"{k}: {v}" for k, v in r.err.items())]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "| summary (geomean over rows) | pass | "
              + " | ".join(f"{b} ×PyTorch | {b} ×naive" for b in ours)
              + " | fastest kernel % copy bandwidth, S ≤ 64 | fused ×triton-unfused |",
              "|---|---|" + "---|---|" * len(ours) + "---|---|"]
    for net in sorted({r.net for r in rows}) + ["all"]:
        for mode in ("fwd", "fwd+bwd"):
            sel = [r for r in rows if r.mode == mode and net in ("all", r.net)]
            small = [100 * r.gbps[_fastest_kernel(r)] / copy_gbps for r in sel
                     if r.S <= 64 and _fastest_kernel(r)]
            versus = [f"{geomean([speedup(r, base, b) for r in sel]):.2f}×"
                      for b in ours for base in ("reference", "naive")]
            unfused = geomean([speedup(r, "triton-unfused", "triton") for r in sel])
            lines.append(f"| geomean {net} | {mode} | " + " | ".join(versus)
                         + f" | {geomean(small):.0f}% | {unfused:.2f}× |")
    return "\n".join(lines) + "\n"


def backends_for(device):
    """The columns timed on `device`: the released approach, PyTorch, then the library's kernels."""
    names = ["naive", "reference", "triton"]
    if "cuda" in gk.available_backends(device):
        names.append("cuda")
    return names + ["auto"]


def meta_for(device, dtype_name):
    """Device, dtype, TF32 flag, versions and date, as the table's first line gives them."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError as error:  # the triton column then says why it is missing
        triton_version = f"not importable ({error})"
    return {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else
            "CPU (Triton interpreter)", "dtype": dtype_name,
            "tf32": torch.backends.cudnn.allow_tf32, "torch": torch.__version__,
            "triton": triton_version, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), required=True)
    parser.add_argument("--out", required=True, help="folder for kernels.md and kernels.json")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="float32")
    parser.add_argument("--nets", default=None,
                        help=f"comma list from {NETS} (default: all on cuda, 4layer on cpu)")
    parser.add_argument("--budget-s", type=float, default=540.0,
                        help="stop timing new layers after this many seconds (table marks it)")
    args = parser.parse_args(argv)
    smoke = args.device == "cpu"
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    if smoke and dtype != torch.float32:
        parser.error("--dtype: the interpreter's half-precision dot is unreliable; use float32 on cpu")
    nets = args.nets.split(",") if args.nets else (["4layer"] if smoke else list(NETS))
    unknown = [n for n in nets if n not in NETS]
    if unknown:
        parser.error(f"--nets: unknown network(s) {unknown}, choose from {NETS}")
    backends = backends_for(device)
    os.makedirs(args.out, exist_ok=True)
    meta = meta_for(device, args.dtype)
    peaks = measure_peaks(device, dtype)
    torch.manual_seed(0)
    rows, started, truncated = [], time.time(), False
    for layer in unique_layers(nets, smoke):
        if time.time() - started > args.budget_s:
            truncated = True
            break
        rows += bench_layer(layer, device, dtype, backends, smoke)
        with open(os.path.join(args.out, "kernels.json"), "w") as f:
            json.dump({"meta": meta, "peaks": peaks, "rows": [asdict(r) for r in rows]}, f, indent=1)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    table = render(rows, backends + ["triton-unfused"], peaks, meta)
    if truncated:
        table += f"\nTruncated: the time budget ({args.budget_s:.0f} s) ran out before every layer.\n"
    with open(os.path.join(args.out, "kernels.md"), "w") as f:
        f.write(table)
    print(table)
    failed = [r for r in rows if not r.ok]
    if failed:
        print(f"{len(failed)} rows failed their correctness check", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
