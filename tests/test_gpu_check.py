"""bench/gpu_check.sh on the CPU: the --quick run's report (every stage, its structure and verdicts),
a budget that stops it, and the stage records that survive a crash and resume."""
import importlib
import json
import os
import subprocess
import sys
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench")
sys.path.insert(0, BENCH)

import gpu_check  # noqa: E402
from gpu_stages import STAGES, report  # noqa: E402
from gpu_stages._context import StageContext  # noqa: E402

import gross_kernels as gk  # noqa: E402

ALLOWED_FILES = {"gpu_report.md", "gpu_report.json", "build.log", "stages.log", "sanitizer.log"}


def _env():
    path = [ROOT, os.path.join(ROOT, "python")] + (
        [os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])
    return dict(os.environ, PYTHONPATH=os.pathsep.join(path), PYTHON=sys.executable)


def _run(out, *extra):
    start = time.time()
    proc = subprocess.run(["bash", os.path.join(BENCH, "gpu_check.sh"), "--device", "cpu", "--quick",
                           "--out", str(out), *extra], env=_env(), capture_output=True, text=True,
                          timeout=900)
    return proc, time.time() - start


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    proc, _ = _run(out)
    assert proc.returncode in (0, 1), proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(out / "gpu_report.json") as f:
        return proc, out, json.load(f)


def _items(result, stage):
    return result["stages"][stage]["data"]["items"]


def test_quick_run_writes_the_report_and_few_files(quick):
    proc, out, result = quick
    files = set(os.listdir(out))
    assert {"gpu_report.md", "gpu_report.json"} <= files <= ALLOWED_FILES
    assert list(result["stages"]) == [stage.name for stage in STAGES]
    markdown = (out / "gpu_report.md").read_text()
    for stage in STAGES:
        title = importlib.import_module(f"gpu_stages.{stage.name}").TITLE
        assert f"### {title}" in markdown
    assert "## Summary" in markdown and "Skipped:" in markdown
    # The report is printed, and its summary again last (the device tool returns the tail).
    assert markdown.splitlines()[0] in proc.stdout
    assert proc.stdout.rstrip().splitlines()[-1].startswith("total ")


def test_quick_run_passes_every_stage_it_can(quick):
    _, _, result = quick
    stages = result["stages"]
    for name in ("build", "correctness", "kernel_bench", "throughput", "decomposition", "sanitizer"):
        assert stages[name]["status"] == "ok", (name, stages[name]["data"])
    dispatch = stages["dispatch"]
    if hasattr(gk, "dispatch_report"):
        assert dispatch["status"] == "ok" and dispatch["data"]["rows"]
    else:  # issue 13 adds it: until then the stage fails at once, saying why
        assert dispatch["status"] == "error" and "dispatch_report" in dispatch["data"]["error"]
    assert result["all_ok"] == hasattr(gk, "dispatch_report")


def test_quick_run_checks_each_backend_against_the_oracle(quick):
    _, _, result = quick
    data = result["stages"]["correctness"]["data"]
    assert data["poison_active"]
    ran = {}
    for key, row in data["items"].items():
        assert row["status"] == "ok", (key, row)
        assert row["nonfinite"] == 0 and row["repeatable"]
        ran.setdefault(key.split(" | ")[2], set()).add(key.split(" | ")[1])
    assert ran["reference"] == ran["auto"] == {"float32", "bfloat16", "float16"}
    assert ran["triton"] == ran["cpp"] == {"float32"}


def test_quick_run_times_kernels_training_and_decomposition(quick):
    _, _, result = quick
    (layer,) = [row for key, row in _items(result, "kernel_bench").items()
                if not key.startswith("peaks")]
    assert all(r["ok"] and {"naive", "reference", "triton", "auto"} <= set(r["ms"])
               for r in layer["rows"])
    throughput = _items(result, "throughput")
    assert len(throughput) == 18
    assert all(row["status"] == "ok" and row["images_per_s"] > 0 for row in throughput.values())
    decomposition = _items(result, "decomposition")
    assert {k for k in decomposition if k != "warm-up"} == {"G=4", "G=2", "G=1"}
    assert all(0 < row["rel_error"] < 1 for k, row in decomposition.items() if k != "warm-up")
    assert all(row["backends"]["triton"] == "ran" for row in _items(result, "sanitizer").values())


def test_budget_stops_the_run_and_says_what_it_skipped(tmp_path):
    budget = 45
    proc, wall = _run(tmp_path, "--budget-s", str(budget))
    assert proc.returncode in (0, 1), proc.stdout[-3000:] + proc.stderr[-3000:]
    # Within the budget, plus the report's grace on a loaded machine.
    assert wall < budget + gpu_check.REPORT_GRACE_S + 5
    with open(tmp_path / "gpu_report.json") as f:
        stages = json.load(f)["stages"]
    last = stages[STAGES[-1].name]
    assert last["status"] == "skipped" and "time budget" in last["run"]["skipped"]
    assert "not started (time budget" in (tmp_path / "gpu_report.md").read_text()


def test_budget_gives_the_earlier_stages_their_minimum_first(monkeypatch):
    budget = gpu_check.Budget(100.0)
    monkeypatch.setattr(budget, "left", lambda: 25.0)
    index = [stage.name for stage in STAGES].index("correctness")
    share = 25.0 * STAGES[index].weight / sum(s.weight for s in STAGES[index:])
    assert share < STAGES[index].min_s
    assert budget.limit(index) == STAGES[index].min_s
    monkeypatch.setattr(budget, "left", lambda: STAGES[index].min_s - 1)
    assert budget.limit(index) == 0.0
    monkeypatch.setattr(budget, "left", lambda: 25.0)
    assert budget.limit(len(STAGES) - 1) == 25.0  # the last stage gets all that is left


def _context(tmp_path, deadline_s=60.0):
    return StageContext(str(tmp_path / "stage.json"), torch.device("cpu"), True,
                        time.time() + deadline_s, str(tmp_path), ROOT)


def test_stage_record_survives_a_crash_and_resumes(tmp_path):
    script = (f"import os, sys, time, torch; sys.path.insert(0, {BENCH!r})\n"
              "from gpu_stages._context import StageContext\n"
              f"ctx = StageContext({str(tmp_path / 'stage.json')!r}, torch.device('cpu'), True, "
              f"time.time() + 60, {str(tmp_path)!r}, {ROOT!r})\n"
              "ctx.plan(['a', 'b', 'c'])\n"
              "ctx.item('a', lambda: {'value': 1})\n"
              "ctx.item('b', lambda: os._exit(7))\n")
    proc = subprocess.run([sys.executable, "-c", script], env=_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 7, proc.stderr[-2000:]
    ctx = _context(tmp_path)
    assert ctx.data["current"] == "b" and ctx.data["items"]["a"]["value"] == 1
    assert ctx.item("a", lambda: pytest.fail("a recorded item ran again"))["value"] == 1
    report._settle({"launches": [{"rc": 7, "note": "the stage process ended: exit status 7"}]},
                   ctx.data)
    assert ctx.data["items"]["b"]["status"] == "crashed"
    assert ctx.data["items"]["c"] == {"status": "skipped", "reason": "not reached: time budget"}
    assert report.status({}, ctx.data) == "failed"


def test_items_record_errors_failures_and_the_deadline(tmp_path):
    ctx = _context(tmp_path)
    assert ctx.item("raises", lambda: 1 / 0)["status"] == "error"
    assert "ZeroDivisionError" in ctx.data["items"]["raises"]["error"]
    assert ctx.item("fails", lambda: {"ok": False})["status"] == "fail"
    assert ctx.item("passes", lambda: {"value": 2})["status"] == "ok"
    ctx.deadline = time.time() - 1
    assert ctx.item("late", lambda: pytest.fail("ran after the deadline"), estimate_s=0) is None
    assert "time budget" in ctx.data["items"]["late"]["reason"]
    with open(tmp_path / "stage.json") as f:  # every item is on disk as soon as it ran
        assert set(json.load(f)["items"]) == {"raises", "fails", "passes", "late"}


def test_bad_arguments_exit_2_with_one_line(tmp_path):
    env = {k: v for k, v in _env().items() if k != "OUT"}
    proc = subprocess.run(["bash", os.path.join(BENCH, "gpu_check.sh"), "--device", "cpu"],
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--out" in proc.stderr.strip().splitlines()[-1]
    proc = subprocess.run(["bash", os.path.join(BENCH, "gpu_check.sh"), "--out", str(tmp_path),
                           "--budget-s", "0"], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--budget-s" in proc.stderr and not os.listdir(tmp_path)


@pytest.mark.parametrize("fault", ["unwritten", "wrong"])
def test_correctness_check_catches_unwritten_and_wrong_outputs(monkeypatch, fault):
    from gpu_stages import correctness

    real = correctness.call_layer

    def faulty(*args):
        y = real(*args)
        if fault == "unwritten":  # an element nothing wrote: NaN once outputs are poisoned
            return y + 0 * torch.empty_like(y)
        return y * 1.05

    monkeypatch.setattr(correctness, "call_layer", faulty)
    layer, group_size = correctness.QUICK_CASES[0]
    row = correctness.check(layer, group_size, torch.float32, "reference", torch.device("cpu"))
    assert not row["ok"]
    assert (row["nonfinite"] > 0) == (fault == "unwritten")
    assert row["fwd_err"] > 1e-2 or fault == "unwritten"


def test_dispatch_stage_records_the_report_as_it_grows(monkeypatch, tmp_path):
    # A stand-in for gk.dispatch_report shows the stage's path and its table.
    from gpu_stages import dispatch

    calls = []

    def report(show=True):
        calls.append(show)
        return [{"signature": {"shape": [2, 3]}, "candidates": {"reference": {"ms": 1.5}},
                 "winner": "reference", "key": "one signature"}]

    monkeypatch.setattr(gk, "dispatch_report", report, raising=False)
    ctx = _context(tmp_path, deadline_s=600.0)
    dispatch.run(ctx)
    items = ctx.data["items"]
    assert items and all(row["status"] == "ok" for row in items.values())
    assert len(calls) == len(items) == len(ctx.data["planned"])
    assert not any(calls)  # recorded, not printed into the stage's log each time
    table = dispatch.render(ctx.data)
    assert "| signature | candidates | winner |" in table and "reference: ms: 1.5" in table
    assert dispatch.summary(ctx.data) == "1 signatures; winners: reference ×1"
