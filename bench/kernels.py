"""Kernel benchmark: every decomposed layer shape of the paper's networks, per backend, forward and forward+backward.

    python bench/kernels.py --device cuda --out DIR      # the GPU table (H100/H200: ~minutes)
    python bench/kernels.py --device cpu --out DIR       # CI smoke test under TRITON_INTERPRET=1

For each unique layer shape and each group size of its series, the whole decomposed layer
(1×1 A → series core → 1×1 C + bias) is checked against backend="reference" and then timed:
naive (the released GroSS approach: expand each term by looping over its filter groups and
concatenating, then three F.conv2d), PyTorch (backend="reference": vectorised expansion + cuDNN),
triton, cuda (when built) and auto. The triton column's achieved GB/s and TFLOP/s are given
against the card's copy bandwidth and matrix-multiply rate, measured at the start of the run.
Timings: warm-up (compilation and autotuning) first, then the median of repeated runs timed with
CUDA events; inputs rotate among several sets when one set would fit in L2.
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
if "--device" in sys.argv and sys.argv[sys.argv.index("--device") + 1] == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import gross_kernels as gk  # noqa: E402
from naive_gross import naive_layer  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Layer:
    """One decomposed convolution: the layer shape and its group-size series."""

    net: str
    names: list
    batch: int
    c_in: int
    c_out: int
    hw: int
    stride: int
    S: int
    T: int
    group_sizes: tuple

    def key(self):
        return (self.net, self.batch, self.c_in, self.c_out, self.hw, self.stride, self.S, self.T,
                self.group_sizes)


@dataclass
class Row:
    """Timings (ms), errors and rates of one layer at one group size in one mode."""

    net: str
    names: list
    shape: str
    G: int
    mode: str
    S: int
    ms: dict = field(default_factory=dict)
    err: dict = field(default_factory=dict)
    ok: bool = True
    gbps: float = float("nan")
    tflops: float = float("nan")


def _powers_of_two(n):
    return tuple(2 ** i for i in range(int(math.log2(n)) + 1))


_VGG = [("conv1_2", 64, 64, 1), ("conv2_1", 64, 128, 2), ("conv2_2", 128, 128, 2),
        ("conv3_1", 128, 256, 4), ("conv3_2", 256, 256, 4), ("conv3_3", 256, 256, 4),
        ("conv4_1", 256, 512, 8), ("conv4_2", 512, 512, 8), ("conv4_3", 512, 512, 8),
        ("conv5_1", 512, 512, 16), ("conv5_2", 512, 512, 16), ("conv5_3", 512, 512, 16)]
_HIGH_COMPRESSION = {  # DESIGN.md §4: bottleneck (S, T) and group sizes per VGG-16 layer
    "conv1_2": (11, 18, (11,)), "conv2_1": (10, 24, (5, 10)), "conv2_2": (28, 28, (1, 7, 14, 28)),
    "conv3_1": (36, 48, (3, 9, 18)), "conv3_2": (60, 48, (15, 30, 60)),
    "conv3_3": (64, 56, (16, 32, 64)), "conv4_1": (64, 100, (16, 32, 64)),
    "conv4_2": (116, 100, (29, 58, 116)), "conv4_3": (132, 132, (3, 33, 66)),
    "conv5_1": (224, 224, (7, 28, 56, 112)), "conv5_2": (224, 224, (7, 28, 56, 112)),
    "conv5_3": (224, 224, (7, 28, 56, 112)),
}
_RESNET18 = [("layer1.*", 64, 64, 56, 1, 4), ("layer2.0.conv1", 64, 128, 56, 2, 1),
             ("layer2.*", 128, 128, 28, 1, 3), ("layer3.0.conv1", 128, 256, 28, 2, 1),
             ("layer3.*", 256, 256, 14, 1, 3), ("layer4.0.conv1", 256, 512, 14, 2, 1),
             ("layer4.*", 512, 512, 7, 1, 3)]
NETS = ("4layer", "vgg16-cifar", "vgg16-imagenet", "resnet18", "vgg16-hc")


def paper_layers(net):
    """The decomposed layers of `net` at the paper's batch size and resolution."""
    if net == "4layer":
        return [Layer(net, [n], 256, ci, co, hw, 1, ci, ci, _powers_of_two(ci))
                for n, ci, co, hw in [("conv2", 32, 32, 16), ("conv3", 32, 64, 8),
                                      ("conv4", 64, 64, 4)]]
    if net in ("vgg16-cifar", "vgg16-imagenet"):
        batch, base = (256, 32) if net == "vgg16-cifar" else (64, 224)
        return [Layer(net, [n], batch, ci, co, base // div, 1, ci, ci, (1, 4, 16, 32))
                for n, ci, co, div in _VGG]
    if net == "resnet18":
        return [Layer(net, [n] * count if count == 1 else [f"{n} ×{count}"], 64, ci, co, hw, s,
                      ci, ci, (1, 4, 16, 32)) for n, ci, co, hw, s, count in _RESNET18]
    if net == "vgg16-hc":
        return [Layer(net, [n], 64, ci, co, 224 // div, 1, *_HIGH_COMPRESSION[n])
                for n, ci, co, div in _VGG]
    raise ValueError(f"--nets: unknown network {net!r}, choose from {NETS}")


def unique_layers(nets, smoke):
    """Paper layers with identical shapes merged (names joined); `smoke` shrinks them for the interpreter."""
    merged = {}
    for net in nets:
        for layer in paper_layers(net):
            if smoke:  # a quarter of the channels, 1 sample, 2×2 pixels, two group sizes
                layer.batch, layer.hw = 1, 2
                layer.c_in, layer.c_out, layer.S, layer.T = (max(4, c // 4) for c in (
                    layer.c_in, layer.c_out, layer.S, layer.T))
                layer.group_sizes = (1, layer.S)
            if layer.key() in merged:
                merged[layer.key()].names += layer.names
            else:
                merged[layer.key()] = layer
    layers = list(merged.values())
    return layers[:1] if smoke else layers  # the interpreter needs ~10 s CPU per small layer


def _sync(device):
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
    _sync(device)
    start = time.perf_counter()
    fn(2)
    _sync(device)
    estimate = max((time.perf_counter() - start) * 1e3, 1e-3)
    reps = int(min(100, max(5, budget_ms / estimate)))
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(reps)]
    for i, (begin, end) in enumerate(events):
        begin.record()
        fn(i)
        end.record()
    _sync(device)
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


def _make_inputs(layer, device, dtype, sets):
    n, hw = layer.batch, layer.hw
    xs = [torch.randn(n, layer.c_in, hw, hw, device=device, dtype=dtype) for _ in range(sets)]

    def param(*shape, fan_in):
        return (torch.randn(*shape, device=device) / math.sqrt(fan_in)).to(dtype)

    firsts = [param(layer.S, layer.c_in, 1, 1, fan_in=layer.c_in) for _ in layer.group_sizes]
    cores = [param(layer.T, g, 3, 3, fan_in=9 * g) for g in layer.group_sizes]
    lasts = [param(layer.c_out, layer.T, 1, 1, fan_in=layer.T) for _ in layer.group_sizes]
    bias = param(layer.c_out, fan_in=1)
    return xs, firsts, cores, lasts, bias


def _tolerance(dtype):
    if dtype == torch.float32:
        return 1e-2 if torch.backends.cudnn.allow_tf32 else 1e-4
    return 3e-2


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def bench_layer(layer, device, dtype, backends, smoke):
    """Rows (forward, forward+backward) for each group size of `layer`."""
    esize = torch.finfo(dtype).bits // 8
    x_bytes = layer.batch * layer.c_in * layer.hw ** 2 * esize
    sets = 1 if smoke or x_bytes > 64 * 2 ** 20 else 4  # rotate inputs that would sit in L2
    xs, firsts, cores, lasts, bias = _make_inputs(layer, device, dtype, sets)
    for t in xs + firsts + cores + lasts + [bias]:
        t.requires_grad_()
    params = firsts + cores + lasts + [bias]
    shape = (f"{layer.batch}×{layer.c_in}×{layer.hw}² → {layer.c_out}, S→T {layer.S}→{layer.T}"
             + (f", stride {layer.stride}" if layer.stride > 1 else ""))
    rows = []
    for G in layer.group_sizes:
        def run(backend, x):
            if backend == "naive":
                return naive_layer(x, firsts, cores, lasts, bias, layer.group_sizes, G,
                                   layer.stride, 1)
            return gk.series_bottleneck_conv2d(x, firsts, cores, lasts, bias, layer.group_sizes,
                                               G, stride=layer.stride, padding=1, backend=backend)

        fwd = Row(layer.net, layer.names, shape, G, "fwd", layer.S)
        both = Row(layer.net, layer.names, shape, G, "fwd+bwd", layer.S)
        x0 = xs[0]
        checked = [x0] + [c for c, g in zip(cores, layer.group_sizes) if g <= G]
        ref_y = run("reference", x0)
        grad_y = torch.randn_like(ref_y)
        ref_grads = torch.autograd.grad(ref_y, checked, grad_y)
        tol = _tolerance(dtype)
        for backend in backends:
            try:
                y = run(backend, x0)
                grads = torch.autograd.grad(y, checked, grad_y)
                fwd.err[backend] = _rel(y, ref_y)
                both.err[backend] = max(_rel(a, b) for a, b in zip(grads, ref_grads))
                fwd.ok &= fwd.err[backend] < tol
                both.ok &= both.err[backend] < tol
                del y, grads
                with torch.no_grad():
                    fwd.ms[backend] = measure(lambda i: run(backend, xs[i % sets]), device, smoke)
                both.ms[backend] = measure(
                    lambda i: torch.autograd.grad(run(backend, xs[i % sets]),
                                                  [xs[i % sets]] + params, grad_y,
                                                  allow_unused=True), device, smoke)
            except Exception as error:  # recorded in the table, never silently dropped
                fwd.err[backend] = both.err[backend] = f"{type(error).__name__}: {error}"[:200]
                fwd.ok = both.ok = False
                print(f"[{layer.net} {layer.names[0]} G={G} {backend}] {error}", file=sys.stderr)
        _time_unfused_forward(fwd, layer, G, xs, firsts, cores, lasts, bias, ref_y, device, smoke)
        flops, xb, yb = layer_costs(layer, G, esize)
        for row, f, b in ((fwd, flops, xb + yb), (both, 3 * flops, 3 * xb + 2 * yb)):
            if "triton" in row.ms:
                row.gbps = b / row.ms["triton"] / 1e6
                row.tflops = f / row.ms["triton"] / 1e9
        rows += [fwd, both]
        del ref_y, ref_grads, grad_y
    return rows


def _time_unfused_forward(row, layer, G, xs, firsts, cores, lasts, bias, ref_y, device, smoke):
    """Where the fused Triton forward applies, also time the three-launch Triton forward (column
    'triton-unfused'), so that the fit rule can be checked against measurements."""
    from gross_kernels.triton import bottleneck as tb

    if not tb.fits_on_chip(layer.c_in, layer.S, layer.T, layer.c_out, (3, 3)):
        return
    active = [i for i, g in enumerate(layer.group_sizes) if g <= G]
    with torch.no_grad():
        args = (sum(firsts[i] for i in active), cores, sum(lasts[i] for i in active), bias,
                layer.group_sizes, G, (layer.stride,) * 2, (1, 1), (1, 1))
        row.err["triton-unfused"] = _rel(tb.forward(xs[0], *args, fused=False), ref_y)
        row.ok &= row.err["triton-unfused"] < _tolerance(xs[0].dtype)
        row.ms["triton-unfused"] = measure(lambda i: tb.forward(xs[i % len(xs)], *args,
                                                                fused=False), device, smoke)


def _geomean(values):
    values = [v for v in values if v > 0 and math.isfinite(v)]
    return math.exp(sum(map(math.log, values)) / len(values)) if values else float("nan")


def _speedup(row, base):
    if "triton" in row.ms and base in row.ms:
        return row.ms[base] / row.ms["triton"]
    return float("nan")


def render(rows, backends, peaks, meta):
    """The markdown table, geometric-mean summary rows last."""
    copy_gbps, mm_tflops = peaks
    head = (["net", "layer", "shape", "G", "pass"] + [f"{b} ms" for b in backends]
            + ["triton vs PyTorch", "triton vs naive", "triton GB/s (% copy)",
               "triton TFLOP/s (% mm)", "check"])
    lines = [f"Device: {meta['device']}; dtype {meta['dtype']}; tf32 {meta['tf32']}; "
             f"torch {meta['torch']}; triton {meta['triton']}; {meta['date']}.",
             f"Measured copy bandwidth {copy_gbps:.0f} GB/s, matmul {mm_tflops:.1f} TFLOP/s.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r.net, ", ".join(r.names), r.shape, str(r.G), r.mode]
        cells += [f"{r.ms[b]:.3f}" if b in r.ms else "—" for b in backends]
        cells += [f"{_speedup(r, 'reference'):.2f}×", f"{_speedup(r, 'naive'):.2f}×",
                  f"{r.gbps:.0f} ({100 * r.gbps / copy_gbps:.0f}%)",
                  f"{r.tflops:.2f} ({100 * r.tflops / mm_tflops:.0f}%)",
                  "ok" if r.ok else "FAIL " + "; ".join(f"{k}: {v}" for k, v in r.err.items())]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "| summary (geomean over rows) | pass | triton vs PyTorch | triton vs naive | "
                  "% copy bandwidth, S ≤ 64 | fused vs triton-unfused |", "|---|---|---|---|---|---|"]
    for net in sorted({r.net for r in rows}) + ["all"]:
        for mode in ("fwd", "fwd+bwd"):
            sel = [r for r in rows if r.mode == mode and net in ("all", r.net)]
            small = [100 * r.gbps / copy_gbps for r in sel if r.S <= 64]
            versus = [_geomean([_speedup(r, b) for r in sel])
                      for b in ("reference", "naive", "triton-unfused")]
            lines.append(f"| geomean {net} | {mode} | {versus[0]:.2f}× | {versus[1]:.2f}× | "
                         f"{_geomean(small):.0f}% | {versus[2]:.2f}× |")
    return "\n".join(lines) + "\n"


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
    backends = ["naive", "reference", "triton"]
    if "cuda" in gk.available_backends(device):
        backends.append("cuda")
    backends.append("auto")
    os.makedirs(args.out, exist_ok=True)
    meta = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else
            "CPU (Triton interpreter)", "dtype": args.dtype,
            "tf32": torch.backends.cudnn.allow_tf32, "torch": torch.__version__,
            "triton": __import__("triton").__version__,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
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
