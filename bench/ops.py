"""Times the whole decomposed layer (gk.series_bottleneck_conv2d) per backend on the paper's layer shapes.

Columns: *torch* (the plainest PyTorch layer: summed weight by one scatter, three F.conv2d,
autograd; `torch_layer.py`), *torch'* (the same again: the noise floor between two identical
columns), *naive* (the released GroSS approach), *reference*, *cpp*, *auto*; rows: layer ×
{smallest, largest} group size × {inference forward, forward+backward with x requiring grad,
forward+backward with x frozen (the first series layer after a frozen stem)}. Medians of repeated runs, the backends
timed round-robin; every ratio compares timings taken in the same run. Prints a markdown table and writes JSON.
`--clock cpu` measures the process's CPU time instead of wall time: with `--threads 1` it is
the work done, unaffected by other processes competing for a shared machine's cores.

    python bench/ops.py [--repeats 5] [--threads 2] [--clock wall] [--out bench/out/ops.json]
"""
import argparse
import json
import os
import platform
import statistics
import time
from datetime import datetime, timezone

import torch

import gross_kernels as gk
from cases import PASSES, make_tensors, ops_layers, runner
from gross_kernels import backends as gk_backends
from gross_kernels.backends.base import Needs
from gross_kernels.geometry import SeriesGeom

# The layers (bench/cases.py): 4-layer conv2-conv4 and four VGG-16 CIFAR layers, bottleneck
# S = T = C_in, 3×3, padding 1.
LAYERS = ops_layers()
BACKENDS = ["torch", "torch'", "naive", "reference", "cpp", "auto"]
BASELINE_NAMES = ("torch", "torch'", "naive")
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def interleaved_medians(fns, repeats, clock):
    """Median ms of each named callable, timed round-robin so that load bursts hit all of them alike.

    One warm-up call each, then `repeats` rounds; each round times every callable once, starting
    from a different one each round.
    """
    for fn in fns.values():
        fn()
    names = list(fns)
    times = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            start = clock()
            fns[name]()
            times[name].append((clock() - start) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def run(repeats, backends, layers, clock):
    """Time every (layer, group size, pass, backend); returns a list of row dicts."""
    rows = []
    for layer in layers:
        for group_size in layer.extremes():
            for pass_ in PASSES:
                tensors = make_tensors(layer)
                row = {"layer": layer.title, "batch": layer.batch, "c_in": layer.c_in,
                       "c_out": layer.c_out, "hw": layer.hw, "group_sizes": list(layer.group_sizes),
                       "group_size": group_size, "pass": pass_}
                fns = {b: runner(b, layer, tensors, group_size, pass_) for b in backends}
                row["ms"] = interleaved_medians(fns, repeats, clock)
                row["auto_path"] = auto_path(layer, tensors, group_size, pass_)
                rows.append(row)
                print(format_row(row, backends), flush=True)
    return rows


def auto_path(layer, tensors, group_size, pass_):
    """What `auto` decided to run on this row (where it is "reference", auto/ref shows noise only)."""
    xs, firsts, cores, lasts, bias = tensors
    geom = SeriesGeom(layer.group_sizes, group_size, *((v,) * 2 for v in
                                                       (layer.stride, layer.padding, layer.dilation)))
    train = pass_ != "fwd"
    needs = Needs(x=pass_ == "fwd+bwd", A=train, cores=train, C=train, bias=train)
    key = gk_backends.signature("bottleneck", xs[0], cores, geom, needs, firsts, lasts, bias).key()
    return next((row["winner"] for row in gk.dispatch_report(show=False) if row["key"] == key), "?")


def ratio(row, a, b):
    ms = row["ms"]
    return ms[a] / ms[b] if a in ms and b in ms else float("nan")


def header(backends):
    cols = (["layer", "N", "G", "pass"] + [f"{b} ms" for b in backends]
            + ["torch/auto", "torch/torch'", "auto/ref", "auto/naive", "cpp/ref", "auto runs"])
    return "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols)


def format_row(row, backends):
    cells = [row["layer"], str(row["batch"]), str(row["group_size"]), row["pass"]]
    cells += [f"{row['ms'][b]:.1f}" for b in backends]
    cells += [f"{ratio(row, 'torch', 'auto'):.2f}", f"{ratio(row, 'torch', 'torch' + chr(39)):.2f}",
              f"{ratio(row, 'auto', 'reference'):.2f}", f"{ratio(row, 'auto', 'naive'):.2f}",
              f"{ratio(row, 'cpp', 'reference'):.2f}", row["auto_path"]]
    return "| " + " | ".join(cells) + " |"


def _geomean(values):
    return statistics.geometric_mean(values) if values else float("nan")


def summary(rows):
    """Speed of *auto* against *torch* (torch ms / auto ms) over the inference and training rows,
    beside the same ratio between the two identical torch columns (the noise floor)."""
    lines = ["| rows | torch/auto geomean | min | max | torch/torch' min | max |",
             "|---|---:|---:|---:|---:|---:|"]
    for label, keep in (("inference (fwd)", lambda r: r["pass"] == "fwd"),
                        ("training (fwd+bwd, both)", lambda r: r["pass"] != "fwd")):
        speed = [ratio(r, "torch", "auto") for r in rows if keep(r)]
        twin = [ratio(r, "torch", "torch'") for r in rows if keep(r)]
        if speed:
            lines.append(f"| {label} | {_geomean(speed):.3f} | {min(speed):.2f} | {max(speed):.2f} | "
                         f"{min(twin):.2f} | {max(twin):.2f} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per cell (median reported)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall", help="wall time or process CPU time")
    parser.add_argument("--layers", default="", help="comma-separated substrings selecting layers")
    parser.add_argument("--out", default="bench/out/ops.json", help="JSON output path")
    parser.add_argument("--use-cache", action="store_true",
                        help="let auto reuse decisions from its disk cache (default: decide in this run)")
    args = parser.parse_args()
    if not args.use_cache:
        os.environ["GROSS_KERNELS_CACHE"] = "off"
    if args.repeats < 1 or args.threads < 1:
        raise ValueError("--repeats and --threads must be >= 1")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    backends = [b for b in BACKENDS
                if b in BASELINE_NAMES or b == "auto" or b in gk.available_backends("cpu")]
    keys = [k for k in args.layers.split(",") if k]
    layers = [layer for layer in LAYERS if not keys or any(k in layer.title for k in keys)]
    print(f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}, {args.threads} threads, {args.clock} clock, median of {args.repeats}, "
          f"load average {os.getloadavg()[0]:.1f}")
    print(header(backends))
    rows = run(args.repeats, backends, layers, CLOCKS[args.clock])
    print()
    print(summary(rows))
    print()
    gk.dispatch_report()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"date": datetime.now(timezone.utc).isoformat(), "machine": platform.platform(),
                   "torch": torch.__version__, "threads": args.threads, "clock": args.clock, "repeats": args.repeats,
                   "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
