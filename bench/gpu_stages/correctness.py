"""Stage 2: every backend against a float64 oracle, forward and all gradients, on a fixed sample of layers.

The sample: paper layers and awkward ones (stride 2, dilation 2, S ≠ T such as 36 → 48, the
series (3, 9, 18), a depthwise core, odd widths), in float32, bfloat16 and float16. Per layer,
dtype and backend, on fresh random inputs: the output and the gradients of x, every A_i, B_i,
C_i and the bias against the float64 oracle (tests/oracle.py on the same inputs upcast); one
run with every new tensor filled with NaN first (an element a kernel leaves unwritten stays NaN);
two more runs whose gradients must be bitwise equal (required of the library's own kernels;
shown for the others). float32 runs with TF32 off, so its tolerance is IEEE's
(bench/cases.py `tolerance`); the kernel benchmark checks the TF32 default.
"""
from __future__ import annotations

import contextlib
import os
import sys
import warnings

import torch

from cases import Layer, call_layer, make_tensors, rel_error, tolerance

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "tests"))
from oracle import naive_bottleneck  # noqa: E402

TITLE = "2. Correctness (float64 oracle, NaN-poisoned outputs, repeatable gradients)"
DTYPES = ("float32", "bfloat16", "float16")
BACKENDS = ("reference", "cpp", "triton", "cuda", "auto")
# Backends whose gradients must be bitwise repeatable (their kernels use no atomics).
DETERMINISTIC = ("cpp", "triton", "cuda")


def _pow2(n):
    return tuple(2 ** i for i in range(n.bit_length()))


# (layer, active group size), most informative first.
CASES = [
    (Layer("vgg16-cifar", ["conv3_2"], 4, 256, 256, 8, 1, 256, 256, (1, 4, 16, 32)), 32),
    (Layer("vgg16-hc", ["conv3_1, 36→48, series (3, 9, 18)"], 2, 128, 256, 14, 1, 36, 48,
           (3, 9, 18)), 18),
    (Layer("resnet18", ["layer2.0.conv1, stride 2"], 2, 64, 128, 28, 2, 64, 64, (1, 4, 16, 32)),
     16),
    (Layer("4layer", ["conv3, depthwise"], 8, 32, 64, 8, 1, 32, 32, _pow2(32)), 1),
    (Layer("", ["dilation 2"], 2, 64, 64, 12, 1, 64, 64, (1, 4, 16, 32), padding=2,
           dilation=2), 4),
    (Layer("vgg16-hc", ["conv5_1, series (7, 28, 56, 112)"], 2, 512, 512, 14, 1, 224, 224,
           (7, 28, 56, 112)), 56),
    (Layer("4layer", ["conv2, dense core"], 8, 32, 32, 16, 1, 32, 32, _pow2(32)), 32),
    (Layer("vgg16-hc", ["conv2_1, 10→24"], 2, 64, 128, 28, 1, 10, 24, (5, 10)), 5),
    (Layer("", ["stride 2, 36→48, 15×15"], 2, 24, 40, 15, 2, 36, 48, (3, 9, 18)), 9),
]
# Tiny cases for Triton's CPU interpreter (--quick); also the sanitizer's two small cases.
QUICK_CASES = [
    (Layer("", ["S≠T 18→12, series (3, 9, 18), stride 2"], 1, 6, 8, 5, 2, 18, 12,
           (3, 9, 18)), 9),
    (Layer("", ["depthwise, dilation 2"], 1, 4, 6, 6, 1, 8, 8, (1, 2, 8), padding=2,
           dilation=2), 1),
]


def case_name(layer, group_size):
    return f"{layer.title} ({layer.shape}) G={group_size}"


@contextlib.contextmanager
def poisoned():
    """Every tensor created inside starts as NaN (deterministic mode's fill of uninitialised
    memory, which covers the extension's and Triton's allocations too)."""
    from torch.utils import deterministic

    before = (torch.are_deterministic_algorithms_enabled(),
              torch.is_deterministic_algorithms_warn_only_enabled(),
              deterministic.fill_uninitialized_memory)
    torch.use_deterministic_algorithms(True, warn_only=True)
    deterministic.fill_uninitialized_memory = True
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        deterministic.fill_uninitialized_memory = before[2]


def _names(layer):
    n = len(layer.group_sizes)
    return ["x"] + [f"{p}{i}" for p in "ABC" for i in range(n)] + ["bias"]


def _parts(leaves, n):
    """(x, firsts, cores, lasts, bias) from the flat list [x, A_0.., B_0.., C_0.., bias]."""
    return leaves[0], leaves[1:1 + n], leaves[1 + n:1 + 2 * n], leaves[1 + 2 * n:1 + 3 * n], leaves[-1]


def check(layer, group_size, dtype, backend, device):
    """One backend on one case: errors against the oracle, NaN-poisoned run, repeatability."""
    xs, firsts, cores, lasts, bias = make_tensors(layer, device, dtype)
    leaves = [xs[0], *firsts, *cores, *lasts, bias]
    n = len(layer.group_sizes)
    wide = [t.detach().double().requires_grad_() for t in leaves]
    want = naive_bottleneck(*_parts(wide, n), layer.group_sizes, group_size, layer.stride,
                            layer.padding, layer.dilation)
    grad_y = torch.randn_like(want).to(dtype)
    want_grads = torch.autograd.grad(want, wide, grad_y.double(), allow_unused=True)
    for t in leaves:
        t.requires_grad_(True)

    def run():
        y = call_layer(backend, layer, *_parts(leaves, n), group_size)
        grads = torch.autograd.grad(y, leaves, grad_y, allow_unused=True)
        return [y] + [torch.zeros_like(t) if g is None else g for g, t in zip(grads, leaves)]

    with poisoned():
        outs = run()
    unwritten = sum(int((~torch.isfinite(t)).sum()) for t in outs)
    errors = {"y": rel_error(outs[0], want)}
    for name, got, ref, leaf in zip(_names(layer), outs[1:], want_grads, wide):
        errors[name] = rel_error(got, torch.zeros_like(leaf) if ref is None else ref)
    first, second = run(), run()
    repeatable = all(torch.equal(a, b) for a, b in zip(first[1:], second[1:]))
    worst = max((k for k in errors if k != "y"), key=errors.get)
    tol = tolerance(dtype)
    ok = (unwritten == 0 and errors["y"] <= tol and errors[worst] <= tol
          and (repeatable or backend not in DETERMINISTIC))
    return {"ok": ok, "fwd_err": errors["y"], "grad_err": errors[worst], "worst_grad": worst,
            "nonfinite": unwritten, "repeatable": repeatable, "tol": tol}


def _unavailable(backend, device, dtype):
    """Why `backend` cannot be checked here (None if it can)."""
    import gross_kernels as gk

    if backend != "auto" and backend not in gk.available_backends(device):
        return f"backend {backend!r} is not available on {device}"
    if device.type == "cpu" and backend == "triton" and dtype != torch.float32:
        return "Triton's interpreter computes half-precision dots wrongly (triton#11584)"
    if backend == "cpp" and dtype not in (torch.float32, torch.float64):
        return "the cpp backend has float32 and float64 kernels only"
    return None


def run(ctx):
    """Check every available backend on every case and dtype (one item each)."""
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    with poisoned():
        probe = torch.empty(16, device=ctx.device)
    ctx.set("poison_active", bool(torch.isnan(probe).all()))
    cases = QUICK_CASES if ctx.quick else CASES
    plan, not_checked = [], {}
    for layer, g in cases:
        for dtype_name in DTYPES:
            for backend in BACKENDS:
                reason = _unavailable(backend, ctx.device, getattr(torch, dtype_name))
                if reason:
                    not_checked.setdefault(reason, set()).add(dtype_name)
                else:
                    plan.append((layer, g, dtype_name, backend))
    ctx.set("not_checked", {reason: sorted(d) for reason, d in not_checked.items()})
    key = "{} | {} | {}".format
    ctx.plan(key(case_name(layer, g), dtype, b) for layer, g, dtype, b in plan)
    for seed, (layer, g, dtype_name, backend) in enumerate(plan):
        def one():
            torch.manual_seed(seed)  # fresh inputs for every item, the same on a rerun
            return check(layer, g, getattr(torch, dtype_name), backend, ctx.device)

        ctx.item(key(case_name(layer, g), dtype_name, backend), one)


def _rows(data):
    for key, row in data.get("items", {}).items():
        case, dtype, backend = key.split(" | ")
        yield case, dtype, backend, row


def render(data):
    """The per-case, per-dtype, per-backend table of errors and checks."""
    lines = [f"NaN poisoning active: {data.get('poison_active')}. Errors: ‖got − oracle‖ / ‖oracle‖ "
             "(float64 oracle on the same inputs); TF32 off. Not checked here: "
             + ("; ".join(f"{reason} ({', '.join(d)})" for reason, d in
                          data.get("not_checked", {}).items()) or "—"), "",
             "| case | dtype | backend | fwd err | worst grad err | non-finite | repeatable | verdict |",
             "|---|---|---|---|---|---|---|---|"]
    for case, dtype, backend, row in _rows(data):
        if row["status"] in ("ok", "fail"):
            cells = [f"{row['fwd_err']:.1e}", f"{row['grad_err']:.1e} ({row['worst_grad']})",
                     str(row["nonfinite"]), "yes" if row["repeatable"] else "NO",
                     "ok" if row["status"] == "ok" else f"FAIL (tol {row['tol']:.0e})"]
        else:
            cells = ["—"] * 4 + [f"{row['status']}: {row.get('reason') or row.get('error', '')}"]
        lines.append(f"| {case} | {dtype} | {backend} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary(data):
    """One line: items passed per backend."""
    per = {}
    for _, _, backend, row in _rows(data):
        if row["status"] != "skipped":
            good, total = per.get(backend, (0, 0))
            per[backend] = (good + (row["status"] == "ok"), total + 1)
    return "; ".join(f"{b} {good}/{total} ok" for b, (good, total) in per.items()) or "nothing ran"
