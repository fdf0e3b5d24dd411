"""GPU evidence in one call: build, correctness, kernel benchmark, dispatch, throughput, decomposition, sanitizer.

    bash bench/gpu_check.sh [--device cuda|cpu] [--quick] [--budget-s 480] [--out DIR]

Writes DIR/gpu_report.md and DIR/gpu_report.json (DIR defaults to $OUT) and logs beside them
(build.log, stages.log, sanitizer.log: at most 5 files), prints the report, and finishes before
the time budget (the build included), saying what it skipped. Each stage (bench/gpu_stages/)
runs in its own process under a time limit, so a stage that fails, hangs or breaks its CUDA
context is recorded and the next stage still runs; a stage whose process died mid-item is
started again for its remaining items while time is left. `--device cpu --quick` runs every
stage on tiny shapes (Triton in its interpreter): the CI check that keeps this script working.

This parent process uses the standard library only: it must not load the extension that the
build stage may be rewriting, and it keeps no CUDA context of its own.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
sys.path.insert(0, BENCH)

from gpu_stages import BROKEN_CONTEXT, LOG_FILES, STAGES  # noqa: E402
from gpu_stages._stdlib import load_source, run_logged  # noqa: E402

# The project's atomic writes, loaded alone: importing the gross_kernels package would load the
# extension that the build stage may be rewriting.
_files = load_source("gross_kernels_files", os.path.join(ROOT, "gross_kernels", "files.py"))

# Seconds kept back at the end of the budget for the report (about 5 s on the GPU machine), and
# the grace it gets beyond the budget on a slow or loaded machine rather than no report at all;
# launches of a stage at most (a stage whose process died is started again for what remains).
REPORT_S, REPORT_GRACE_S = 15.0, 30.0
MAX_LAUNCHES = 3


class Budget:
    """The shared clock: seconds left of the budget, and each stage's share of them."""

    def __init__(self, total_s):
        self.total_s, self.start = total_s, time.time()

    def elapsed(self):
        return time.time() - self.start

    def left(self):
        """Seconds left for stages (the report's reserve excluded)."""
        return self.total_s - REPORT_S - self.elapsed()

    def limit(self, index):
        """Stage `index`'s time limit: its weight's share of what is left (over it and the later
        stages), raised to the stage's minimum while time lasts, so that earlier stages (the more
        informative) are the last to go; 0 when less than that minimum is left."""
        stage, left = STAGES[index], self.left()
        if left < stage.min_s:
            return 0.0
        share = left * stage.weight / sum(s.weight for s in STAGES[index:])
        return min(left, max(share, stage.min_s))


def _child_env(args):
    """The stage processes' environment: this tree first on the path, Triton's interpreter on the
    CPU, and there one thread per process for --quick (a check on a small shared machine, not a
    measurement)."""
    path = [ROOT, os.path.join(ROOT, "python"), BENCH] + (
        [os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(path), PYTHONUNBUFFERED="1",
               TRITON_INTERPRET="1" if args.device == "cpu" else "0")
    if args.device == "cpu" and args.quick:
        env.setdefault("OMP_NUM_THREADS", "1")
    return env


def run_stage(index, args, budget, work):
    """Run stage `index` (relaunching it after a crash while its time lasts); returns the parent's record."""
    stage = STAGES[index]
    limit = budget.limit(index)
    record = {"name": stage.name, "limit_s": round(limit, 1), "launches": []}
    if not limit:
        record["skipped"] = (f"time budget: {max(0.0, budget.left()):.0f} s left, "
                             f"{stage.min_s:.0f} s needed")
        return record
    deadline = time.time() + limit
    log = os.path.join(args.out, LOG_FILES["stages"])
    interrupted = None
    started = time.time()
    while len(record["launches"]) < MAX_LAUNCHES:
        cmd = [sys.executable, os.path.abspath(__file__), "--stage", stage.name, "--work", work,
               "--device", args.device, "--out", args.out, "--deadline", f"{deadline - 2.0:.3f}"]
        cmd += ["--quick"] if args.quick else []
        cmd += ["--interrupted", interrupted] if interrupted else []
        rc, output = run_logged(cmd, log, deadline - time.time(), _child_env(args), ROOT)
        if rc == 0:
            record["launches"].append({"rc": 0})
            break
        why = ("killed at its time limit" if rc is None else
               "its CUDA context broke" if rc == BROKEN_CONTEXT else f"exit status {rc}")
        last = "\n".join(output.splitlines()[-12:])
        interrupted = f"the stage process ended: {why}; its last output:\n{last}"
        record["launches"].append({"rc": rc, "note": interrupted})
        if rc is None or deadline - time.time() < stage.min_s:
            break
    record["seconds"] = round(time.time() - started, 1)
    return record


def _save_records(out, work, runs):
    """The parent's launch records (for the report process) and, until the report replaces it, a
    raw gpu_report.json of every record so far: a call cut short still brings them back."""
    _files.atomic_write_json(os.path.join(work, "runs.json"), runs)
    records = {}
    for run in runs:
        path = os.path.join(work, f"{run['name']}.json")
        if os.path.exists(path):
            with open(path) as f:
                records[run["name"]] = json.load(f)
    _files.atomic_write_json(os.path.join(out, "gpu_report.json"),
                             {"partial": True, "runs": runs, "records": records, "all_ok": False})


def _render(args, work, budget):
    """Write the report (a process of its own: it imports the stages); returns its exit status."""
    cmd = [sys.executable, os.path.abspath(__file__), "--render", "--work", work, "--device",
           args.device, "--out", args.out, "--budget-s", str(args.budget_s),
           "--elapsed", f"{budget.elapsed():.1f}"] + (["--quick"] if args.quick else [])
    rc, _ = run_logged(cmd, os.path.join(args.out, LOG_FILES["stages"]),
                       REPORT_S + REPORT_GRACE_S + max(0.0, budget.left()), _child_env(args),
                       ROOT)
    return rc


def _parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--quick", action="store_true", help="tiny shapes (the CPU check in CI)")
    parser.add_argument("--budget-s", type=float, default=480.0,
                        help="finish within this many seconds, the build included (default 480)")
    parser.add_argument("--out", default=os.environ.get("OUT"),
                        help="folder for the report and logs (default: $OUT)")
    # Used by this script's own processes.
    parser.add_argument("--stage", help=argparse.SUPPRESS)
    parser.add_argument("--render", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--interrupted", help=argparse.SUPPRESS)
    parser.add_argument("--elapsed", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not args.out:
        parser.error("--out: no folder given and $OUT is not set")
    if args.budget_s <= 0:
        parser.error(f"--budget-s must be > 0, got {args.budget_s}")
    return args


def _child(args):
    """This process is one stage, or the report: import what it needs and run it."""
    import importlib

    if args.render:
        from gpu_stages import report
        return report.write(args)
    import torch
    from gpu_stages._context import StageContext

    ctx = StageContext(os.path.join(args.work, f"{args.stage}.json"), torch.device(args.device),
                       args.quick, args.deadline, args.out, ROOT)
    if args.interrupted and ctx.data.get("current"):
        ctx.data["items"][ctx.data["current"]] = {"status": "crashed", "error": args.interrupted}
        ctx.data["current"] = None
    module = importlib.import_module(f"gpu_stages.{args.stage}")
    from gpu_stages._context import StageError

    try:
        module.run(ctx)
    except StageError as error:
        ctx.set("error", str(error))
    except Exception as error:  # recorded in the report; the next stage still runs
        import traceback
        traceback.print_exc()
        ctx.set("error", f"{type(error).__name__}: {error}"[:1000])
    return 0


def main(argv=None):
    args = _parse(argv)
    if args.stage or args.render:
        return _child(args)
    budget = Budget(args.budget_s)
    os.makedirs(args.out, exist_ok=True)
    work = tempfile.mkdtemp(prefix="gpu_check.")
    try:
        runs = []
        for index, stage in enumerate(STAGES):
            print(f"[{budget.elapsed():5.0f} s] {stage.name} ...", flush=True)
            runs.append(run_stage(index, args, budget, work))
            _save_records(args.out, work, runs)
            note = runs[-1].get("skipped") or ", ".join(
                "finished" if r["rc"] == 0 else "ended early" for r in runs[-1]["launches"])
            print(f"[{budget.elapsed():5.0f} s] {stage.name}: {note}", flush=True)
        rc = _render(args, work, budget)
        report = os.path.join(args.out, "gpu_report.md")
        if rc != 0 or not os.path.exists(report):
            print(f"the report could not be written (exit status {rc}); stage records:", flush=True)
            print(json.dumps(runs, indent=1))
            return 1
        with open(report) as f:
            print(f.read(), flush=True)
        with open(os.path.join(args.out, "gpu_report.json")) as f:
            result = json.load(f)
        # Again at the very end: a caller that keeps only the output's tail still gets it.
        print(f"\n## Summary (repeated)\n\n{result['summary_md']}\n\ntotal {budget.elapsed():.0f} s "
              f"of a {args.budget_s:.0f} s budget; files in {args.out}: "
              f"{', '.join(sorted(os.listdir(args.out)))}", flush=True)
        return 0 if result["all_ok"] else 1
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
