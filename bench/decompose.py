"""Benchmark: gross.decompose.btd against the tensorly oracle PCI (bench/tensorly_pci.py).

Rows: the 4-layer net's conv3 (64×32×3×3, S=32) at every group size, and VGG-16-sized layers
128×128, 256×256, 512×512 (S = C_in) at group sizes 1, 4, 16, 32, on random weights and on
weights with a decaying spectrum. Both sides use the same stopping rule (relative error changes
by at most --tol over one pass). The oracle is cut after --oracle-max-seconds per row; a cut row
reports the error it had reached (an upper bound on its final error) and a time extrapolated from
its measured per-iteration time × the most passes any of our methods needed (marked "extrap."). One row per
method of ours (--methods), against the same oracle run. Prints a Markdown table.

    python bench/decompose.py [--quick] [--oracle-max-seconds 60] [--threads 2] [--methods pci,als]
                              [--work-dtype float64]
    python bench/decompose.py --vgg-series [--jobs 2] [--vgg-layers 1-7]   # the VGG-16 CIFAR series
"""
import os

# The oracle is timed at its best: single-threaded OpenBLAS (must be set before numpy loads).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from gross.decompose import _series_jobs, _series_layers, btd  # noqa: E402

# VGG-16 (CIFAR) conv1_2 … conv5_3 as (C_in, C_out): the layers the paper decomposes.
VGG16_LAYERS = [(64, 64), (64, 128), (128, 128), (128, 256), (256, 256), (256, 256), (256, 512),
                (512, 512), (512, 512), (512, 512), (512, 512), (512, 512)]


def make_weight(c_out, c_in, kind, seed):
    """A random 3×3 conv weight; "decay" gives both channel modes exponentially decaying spectra."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(c_out, c_in, 3, 3, generator=g, dtype=torch.float64)
    if kind == "decay":
        for mode, n in ((0, c_out), (1, c_in)):
            Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
            M = Q @ torch.diag(torch.exp(-4.0 * torch.arange(n, dtype=torch.float64) / n)) @ Q.T
            W = torch.movedim(torch.tensordot(M, W, dims=([1], [mode])), 0, mode)
    return W


def rows(quick):
    conv3 = [(64, 32, g) for g in (1, 2, 4, 8, 16, 32)]
    vgg = [(n, n, g) for n in ((128,) if quick else (128, 256, 512)) for g in (1, 4, 16, 32)]
    return conv3 + vgg


def run_rows(c_out, c_in, G, kind, args):
    """Our btd with each method, then the oracle, on one weight; one result dict per method."""
    # Imported here: make_weight serves bench/gpu_check.py on machines without tensorly.
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from tensorly_pci import pci

    W = make_weight(c_out, c_in, kind, seed=c_out * 1000 + c_in)
    S = T = c_in
    ours = {}
    for method in args.methods.split(","):
        start = time.perf_counter()
        res = btd(W, G, (S, T), tol=args.tol, max_iter=args.max_iter, method=method,
                  work_dtype=getattr(torch, args.work_dtype))
        ours[method] = (res, time.perf_counter() - start)
    oracle = pci(W.numpy(), G, (S, T), tol=args.tol, max_iter=args.max_iter,
                 max_seconds=args.oracle_max_seconds)
    oracle_s = oracle["seconds"]
    if oracle["cut"]:
        needed = max(res.iterations for res, _ in ours.values())
        oracle_s *= max(needed, oracle["iterations"]) / oracle["iterations"]
    return [dict(shape=f"{c_out}×{c_in}", G=G, kind=kind, method=m, ours_err=res.rel_error,
                 ours_it=res.iterations, ours_s=sec, or_err=oracle["rel_error"], or_it=oracle["iterations"],
                 or_s=oracle_s, cut=oracle["cut"]) for m, (res, sec) in ours.items()]


def verdict(r):
    """yes / NO (a tie within 1e-6 relative counts as yes), or "n/a" where a cut oracle had not finished."""
    if r["ours_err"] > r["or_err"] * (1 + 1e-6):
        return "NO"
    return "n/a (cut)" if r["cut"] else "yes"


def layer_numbers(text):
    """1-based VGG-16 layer numbers from "1-4,8" (None: all twelve)."""
    if text is None:
        return list(range(1, len(VGG16_LAYERS) + 1))
    numbers = []
    for part in text.split(","):
        first, _, last = part.partition("-")
        numbers += range(int(first), int(last or first) + 1)
    if not all(1 <= n <= len(VGG16_LAYERS) for n in numbers):
        raise ValueError(f"--vgg-layers must name layers 1..{len(VGG16_LAYERS)}, got {text!r}")
    return numbers


def vgg_series(args):
    """Time the GroSS series of the VGG-16 CIFAR layers (He-normal weights) at sizes 1, 4, 16, 32.

    All layers' BTDs go to `--jobs` worker processes at once, through the code
    `gross.convert(..., workers=)` runs; the total is the wall time from the first BTD to the last
    series layer built.
    Per layer: the seconds its BTDs took inside their processes (summed), errors and passes.
    """
    convs = {}
    for i in (n - 1 for n in layer_numbers(args.vgg_layers)):
        c_in, c_out = VGG16_LAYERS[i]
        torch.manual_seed(i + 1)  # per layer, so a run of some layers sees the same weights as the whole series
        conv = torch.nn.Conv2d(c_in, c_out, 3, padding=1)
        torch.nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
        convs[i + 1] = conv
    plans = {n: _series_jobs(conv, [1, 4, 16, 32], None, tol=args.tol, max_iter=args.max_iter,
                             method=args.methods.split(",")[0], device=None,
                             work_dtype=getattr(torch, args.work_dtype)) for n, conv in convs.items()}
    start = time.perf_counter()
    per_layer = {n: results for n, (_, results) in _series_layers(convs, plans, args.jobs, progress=True).items()}
    wall = time.perf_counter() - start
    print("| layer | C_in→C_out | BTD seconds (sum) | errors at 1, 4, 16, 32 | passes at 1, 4, 16, 32 |\n"
          "|---|---|---|---|---|")
    for n, res in per_layer.items():
        c_in, c_out = VGG16_LAYERS[n - 1]
        print(f"| {n} | {c_in}→{c_out} | {sum(r.seconds for r in res):.1f} | "
              f"{', '.join(f'{r.rel_error:.4f}' for r in res)} | {', '.join(str(r.iterations) for r in res)} |")
    busy = sum(r.seconds for res in per_layer.values() for r in res)
    print(f"\nthese VGG-16 layers' series: {wall:.1f} s wall ({wall / 60:.1f} min) with {args.jobs} worker "
          f"process(es); BTD seconds summed over processes {busy:.1f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="conv3 and the 128×128 layer only")
    parser.add_argument("--oracle-max-seconds", type=float, default=60.0)
    parser.add_argument("--tol", type=float, default=1e-5)
    parser.add_argument("--max-iter", type=int, default=500)
    parser.add_argument("--threads", type=int, default=2, help="torch threads for our btd")
    parser.add_argument("--kinds", default="random,decay")
    parser.add_argument("--methods", default="pci", help="comma-separated btd methods to time (pci, als)")
    parser.add_argument("--work-dtype", default="float32", choices=("float32", "float64"),
                        help="working precision of our PCI passes (btd's work_dtype)")
    parser.add_argument("--only", default=None, help="comma-separated shapes to run, e.g. 64x32,128x128")
    parser.add_argument("--group-sizes", default=None, help="comma-separated group sizes to run (default all)")
    parser.add_argument("--vgg-series", action="store_true",
                        help="instead of the table, time series() over all 12 VGG-16 layers (first of --methods)")
    parser.add_argument("--jobs", type=int, default=2,
                        help="with --vgg-series, worker processes for the BTDs (each gets --threads / --jobs threads)")
    parser.add_argument("--vgg-layers", default=None,
                        help="with --vgg-series, only these 1-based layers, e.g. 1-7,8 (default all 12)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch threads {args.threads}, jobs {args.jobs}, work dtype {args.work_dtype}, "
          f"oracle OPENBLAS_NUM_THREADS={os.environ['OPENBLAS_NUM_THREADS']}, "
          f"tol {args.tol}, max_iter {args.max_iter}, oracle cut at {args.oracle_max_seconds}s", flush=True)
    if args.vgg_series:
        return vgg_series(args)
    print("| layer | G | weights | method | ours err | ours it | ours s | oracle err | oracle it | oracle s "
          "| speed-up | err ≤ oracle |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|", flush=True)
    speedups = {}
    for c_out, c_in, G in rows(args.quick):
        if args.only and f"{c_out}x{c_in}" not in args.only.split(","):
            continue
        if args.group_sizes and str(G) not in args.group_sizes.split(","):
            continue
        for kind in args.kinds.split(","):
            for r in run_rows(c_out, c_in, G, kind, args):
                speedup = r["or_s"] / r["ours_s"]
                speedups.setdefault(r["method"], []).append(speedup)
                mark = " (extrap.)" if r["cut"] else ""
                print(f"| {r['shape']} | {G} | {kind} | {r['method']} | {r['ours_err']:.6f} | {r['ours_it']} | "
                      f"{r['ours_s']:.2f} | {r['or_err']:.6f}{' (at cut)' if r['cut'] else ''} | {r['or_it']} | "
                      f"{r['or_s']:.2f}{mark} | {speedup:.1f}× | {verdict(r)} |",
                      flush=True)
    for method, values in speedups.items():
        geo = math.exp(sum(math.log(v) for v in values) / len(values))
        print(f"\ngeometric mean speed-up of {method} over {len(values)} rows: {geo:.1f}×")


if __name__ == "__main__":
    main()
