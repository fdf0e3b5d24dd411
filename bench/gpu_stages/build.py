"""Stage 1: the machine (card, driver, versions), and the extension built for the card's own architecture.

The build is skipped when the extension already loads and its kernels run here (a probe in a
fresh process: a CUDA build must also launch on this card's architecture). Otherwise
`setup.py build_ext --inplace` runs with every core (MAX_JOBS), TORCH_CUDA_ARCH_LIST set to the
card's compute capability, GROSS_CUDA=1 and a CUDA_HOME checked to hold nvcc and the runtime
headers; its output goes to build.log.
"""
from __future__ import annotations

import glob
import json
import os
import platform
import shutil
import subprocess
import sys
import time

import torch

from gpu_stages import LOG_FILES
from gpu_stages._stdlib import load_source, run_logged

TITLE = "1. Machine and build"


def _command_output(cmd, timeout_s=30):
    """stdout of cmd, stripped ("" if it is missing, fails or hangs)."""
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return done.stdout.strip() if done.returncode == 0 else ""


def find_cuda_home(root):
    """The first CUDA toolkit root among $CUDA_HOME, $CUDA_PATH, nvcc's own folder (links
    followed: /usr/local/bin/nvcc can be a wrapper script), /usr/local/cuda, /usr/local/cuda-*."""
    # setup.py's own check (loading setup.py builds nothing: its main() runs as a script only).
    is_toolkit = load_source("gross_setup", os.path.join(root, "setup.py")).is_cuda_toolkit
    nvcc = shutil.which("nvcc")
    versioned = sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    if torch.version.cuda:
        versioned.insert(0, f"/usr/local/cuda-{torch.version.cuda}")
    guesses = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"),
               os.path.dirname(os.path.dirname(os.path.realpath(nvcc))) if nvcc else None,
               "/usr/local/cuda", *versioned]
    return next((path for path in guesses if is_toolkit(path)), None)


def _environment(device, cuda_home):
    env = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "python": platform.python_version(), "torch": torch.__version__,
           "torch_cuda": torch.version.cuda, "cpus": os.cpu_count(),
           "machine": platform.machine(), "cuda_home": cuda_home}
    try:
        import triton
        env["triton"] = triton.__version__
    except Exception as error:  # the report says why the Triton backend is missing
        env["triton"] = f"does not import: {error}"
    if cuda_home:
        version = _command_output([os.path.join(cuda_home, "bin", "nvcc"), "--version"])
        env["nvcc"] = version.splitlines()[-1] if version else "?"
    env["git"] = _command_output(["git", "-C", os.path.dirname(__file__), "log", "-1",
                                  "--format=%h %cd", "--date=short"])
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(device=props.name, capability=f"{props.major}.{props.minor}",
                   multiprocessors=props.multi_processor_count,
                   memory_gib=round(props.total_memory / 2 ** 30, 1),
                   cudnn=torch.backends.cudnn.version(),
                   nvidia_smi=_command_output(["nvidia-smi", "--query-gpu=name,driver_version,"
                                               "memory.total,clocks.max.sm", "--format=csv,noheader"]))
    else:
        env["device"] = f"CPU ({platform.processor() or platform.machine()})"
    return env


def probe(device_name):
    """In a fresh process: does the compiled backend run a small series conv here, and agree?"""
    import gross_kernels as gk

    device = torch.device(device_name)
    backend = "cuda" if device.type == "cuda" else "cpp"
    x = torch.randn(2, 8, 5, 5, device=device)
    cores = [torch.randn(8, g, 3, 3, device=device) for g in (1, 4)]
    result = {"backend": backend}
    try:
        got = gk.series_grouped_conv2d(x, cores, [1, 4], 4, padding=1, backend=backend)
        want = gk.series_grouped_conv2d(x, cores, [1, 4], 4, padding=1, backend="reference")
        error = ((got - want).norm() / want.norm()).item()
        # Which file: an editable install elsewhere can map gross_kernels._C to its own build.
        where = sys.modules["gross_kernels._C"].__file__
        result.update(loadable=error < 1e-2,
                      detail=f"{where}: relative error {error:.1e} against reference")
    except Exception as error:  # not built, built for another torch or arch, or wrong
        result.update(loadable=False, detail=f"{type(error).__name__}: {error}"[:500])
    print(json.dumps(result))


def _probe(ctx):
    cmd = [sys.executable, "-c", f"from gpu_stages import build; build.probe({ctx.device.type!r})"]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=ctx.root,
                              timeout=max(5.0, min(120.0, ctx.left())))
    except subprocess.TimeoutExpired:
        return {"loadable": False, "detail": "the probe did not finish in time"}
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        return {"loadable": False, "detail": (done.stderr or done.stdout)[-500:]}
    return json.loads(lines[-1])


def _must_load(ctx):
    """The probe after a build: now a failing probe fails the stage."""
    result = _probe(ctx)
    return dict(result, ok=result["loadable"])


def _build(ctx, cuda_home):
    env = dict(os.environ, MAX_JOBS=str(os.cpu_count() or 1))
    row = {"max_jobs": env["MAX_JOBS"]}
    if ctx.device.type == "cuda":
        if cuda_home is None:
            return dict(row, ok=False, detail="no CUDA toolkit found (nvcc and cuda_runtime.h)")
        major, minor = torch.cuda.get_device_capability(ctx.device)
        env.update(CUDA_HOME=cuda_home, GROSS_CUDA="1", TORCH_CUDA_ARCH_LIST=f"{major}.{minor}",
                   PATH=os.path.join(cuda_home, "bin") + os.pathsep + env.get("PATH", ""))
        row["arch_list"] = env["TORCH_CUDA_ARCH_LIST"]
    # The compilers run in the build's process group: a build cut at the time limit leaves none.
    rc, output = run_logged([sys.executable, "setup.py", "build_ext", "--inplace"],
                            os.path.join(ctx.out, LOG_FILES["build"]), ctx.left() - 10, env,
                            ctx.root)
    row["rc"] = "killed at the stage's time limit" if rc is None else rc
    row["log_tail"] = output[-1500:]
    row["ok"] = row["rc"] == 0
    return row


def run(ctx):
    """Record the machine, probe the extension, build it if it does not run here, probe again."""
    cuda_home = find_cuda_home(ctx.root)
    ctx.set("env", _environment(ctx.device, cuda_home))
    before = ctx.item("probe before", lambda: _probe(ctx), estimate_s=0)
    if before and before.get("loadable"):
        ctx.set("built", "already built and loadable: build skipped")
        return
    build = ctx.item("build", lambda: _build(ctx, cuda_home), estimate_s=0)
    if build and build["status"] == "ok":
        ctx.item("probe after", lambda: _must_load(ctx), estimate_s=0)


def render(data):
    """The machine's facts, the build's outcome and the probes, as a list."""
    env = data.get("env", {})
    lines = [f"- {key}: {value}" for key, value in env.items()]
    items = data.get("items", {})
    if data.get("built"):
        lines.append(f"- extension: {data['built']} ({items['probe before'].get('detail', '')})")
    build = items.get("build")
    if build:
        lines.append(f"- build: {build['status']} in {build.get('seconds', 0):.0f} s "
                     f"(MAX_JOBS {build.get('max_jobs')}, TORCH_CUDA_ARCH_LIST "
                     f"{build.get('arch_list', 'setup.py default')}); log in build.log")
        if build["status"] != "ok":
            lines += ["", "```", build.get("log_tail", build.get("error", "")), "```"]
    for key in ("probe before", "probe after"):
        if key in items:
            lines.append(f"- {key}: {items[key].get('status')}: {items[key].get('detail', '')}")
    return "\n".join(lines)


def summary(data):
    """One line: card, versions, whether the compiled kernels run."""
    env, items = data.get("env", {}), data.get("items", {})
    built = "extension already built" if data.get("built") else (
        f"built in {items['build'].get('seconds', 0):.0f} s" if "build" in items else "not built")
    after = items.get("probe after", items.get("probe before", {}))
    return (f"{env.get('device', '?')}, torch {env.get('torch', '?')}, triton "
            f"{env.get('triton', '?')}; {built}; compiled kernels "
            f"{'run' if after.get('loadable') else 'do not run'} here")
