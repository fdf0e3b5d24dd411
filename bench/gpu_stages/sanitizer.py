"""Stage 2, last part: compute-sanitizer memcheck on two small cases, in whatever time remains.

The two cases are the correctness stage's tiny ones (S ≠ T with the series (3, 9, 18) and
stride 2 in float32; depthwise with dilation 2 in bfloat16): the forward and backward of the
cuda and triton backends, each case in its own process under `compute-sanitizer --tool memcheck`
with PyTorch's caching allocator off, as csrc/ops/cuda/run_sanitizers.sh runs the CUDA tests
(which also adds racecheck over the whole `-k small` test set, when a call has time for it).
Without a GPU or compute-sanitizer the cases run unchecked in the stage's process, so that they
stay exercised.
"""
from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import sys

import torch

import gross_kernels as gk
from cases import call_layer, make_tensors
from gpu_stages import LOG_FILES
from gpu_stages._stdlib import run_logged
from gpu_stages.build import find_cuda_home
from gpu_stages.correctness import QUICK_CASES, case_name

TITLE = "2b. compute-sanitizer memcheck (two small cases)"
DTYPES = ("float32", "bfloat16")


def find_sanitizer(root):
    """$COMPUTE_SANITIZER (as run_sanitizers.sh reads it), else compute-sanitizer in the CUDA
    toolkit the build stage uses, else on PATH; None if there is none."""
    cuda_home = find_cuda_home(root)
    guesses = [os.environ.get("COMPUTE_SANITIZER"),
               os.path.join(cuda_home, "bin", "compute-sanitizer") if cuda_home else None]
    found = next((g for g in guesses if g and os.access(g, os.X_OK)), None)
    return found or shutil.which("compute-sanitizer")


def run_case(index, device_name):
    """In its own process: case `index`'s forward and backward with the cuda and triton backends."""
    layer, group_size = QUICK_CASES[index]
    device, dtype = torch.device(device_name), getattr(torch, DTYPES[index])
    torch.manual_seed(index)
    xs, firsts, cores, lasts, bias = make_tensors(layer, device, dtype)
    leaves = [xs[0], *firsts, *cores, *lasts, bias]
    for t in leaves:
        t.requires_grad_(True)
    for backend in ("cuda", "triton"):
        if backend not in gk.available_backends(device):
            print(f"{backend}: not available on {device}")
            continue
        y = call_layer(backend, layer, xs[0], firsts, cores, lasts, bias, group_size)
        torch.autograd.grad(y, leaves, torch.randn_like(y), allow_unused=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        print(f"{backend}: ran")


def _backends(output):
    """{backend: "ran" or why not} from run_case's output."""
    return dict(re.findall(r"^(cuda|triton): (.*)$", output, re.M))


def _unchecked(ctx, index):
    """Without a sanitizer: the case in this process (its output captured as the log's would be)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        run_case(index, ctx.device.type)
    return {"ok": True, "rc": 0, "errors": None,
            "backends": _backends(out.getvalue()), "tail": ""}


def _check(ctx, index, sanitizer):
    """Case `index` in its own process under memcheck; its output goes to sanitizer.log."""
    cmd = [sanitizer, "--tool", "memcheck", "--target-processes", "all", "--error-exitcode", "1",
           sys.executable, "-c",
           f"from gpu_stages import sanitizer; sanitizer.run_case({index}, {ctx.device.type!r})"]
    env = dict(os.environ, PYTORCH_NO_CUDA_MEMORY_CACHING="1")
    rc, output = run_logged(cmd, os.path.join(ctx.out, LOG_FILES["sanitizer"]), ctx.left() - 2,
                            env, ctx.root)
    errors = re.findall(r"ERROR SUMMARY: (\d+) error", output)
    return {"ok": rc == 0, "rc": rc if rc is not None else "killed at the time limit",
            "errors": int(errors[-1]) if errors else None, "backends": _backends(output),
            "tail": "\n".join(output.splitlines()[-8:])}


def run(ctx):
    """Run the two cases under memcheck (or unchecked without a sanitizer)."""
    sanitizer = find_sanitizer(ctx.root) if ctx.device.type == "cuda" else None
    ctx.set("checked", sanitizer is not None)
    ctx.set("sanitizer", sanitizer or "none (no GPU, or compute-sanitizer not found): "
                                      "the cases ran unchecked")
    keys = [f"{case_name(*case)} | {dtype}" for case, dtype in zip(QUICK_CASES, DTYPES)]
    ctx.plan(keys)
    for index, key in enumerate(keys):
        ctx.item(key, lambda: _check(ctx, index, sanitizer) if sanitizer else _unchecked(ctx, index),
                 estimate_s=5.0)


def _checked(data):
    """Whether memcheck watched the cases."""
    return bool(data.get("checked"))


def render(data):
    """The cases' verdicts, error counts and the failing output's tail."""
    lines = [f"Sanitizer: {data.get('sanitizer')}" + ("; its output in sanitizer.log."
                                                      if _checked(data) else "."), "",
             "| case | dtype | verdict | memcheck errors | backends | exit status |",
             "|---|---|---|---|---|---|"]
    for key, row in data.get("items", {}).items():
        case, dtype = key.split(" | ")
        if row["status"] in ("ok", "fail"):
            backends = ", ".join(f"{b} {s}" for b, s in row["backends"].items())
            errors = "—" if row["errors"] is None else row["errors"]
            lines.append(f"| {case} | {dtype} | {row['status']} | {errors} | {backends} | "
                         f"{row['rc']} |")
            if row["status"] == "fail":
                lines += ["", "```", row["tail"], "```", ""]
        else:
            lines.append(f"| {case} | {dtype} | {row['status']}: "
                         f"{row.get('error', row.get('reason', ''))} | | | |")
    return "\n".join(lines)


def summary(data):
    """One line: how many cases ran clean, and whether memcheck watched them."""
    rows = data.get("items", {}).values()
    checked = "memcheck" if _checked(data) else "unchecked"
    return (f"{sum(r['status'] == 'ok' for r in rows)}/{len(rows)} cases clean ({checked})"
            if rows else "nothing ran")
