"""The report of bench/gpu_check.py: gpu_report.md (machine, summary, every stage's tables, what was
skipped) and gpu_report.json (every record), written from the stages' records in the work folder."""
from __future__ import annotations

import importlib
import json
import os
import time

from gpu_stages import STAGES
from gross_kernels.files import atomic_write, atomic_write_json

# Item statuses that fail a stage; "skipped" items with a budget reason make it "partial".
FAILED = ("fail", "error", "crashed", "timeout")


def _load(path, default):
    if not os.path.exists(path):
        return default
    with open(path) as f:
        return json.load(f)


def _settle(run, data):
    """Mark the item that was in flight when the stage's last process ended, and the planned
    items never reached."""
    current = data.get("current")
    if current:
        note = (run.get("launches") or [{}])[-1].get("note", "the stage process ended")
        status = "timeout" if "time limit" in note else "crashed"
        data["items"][current] = {"status": status, "error": note}
        data["current"] = None
    for key in data.get("planned", []):
        data["items"].setdefault(key, {"status": "skipped", "reason": "not reached: time budget"})


def status(run, data):
    """One word for the stage: skipped, error, failed, partial or ok."""
    if run.get("skipped"):
        return "skipped"
    if data.get("error") or not data.get("items") and not data.get("env"):
        return "error"
    states = [row["status"] for row in data["items"].values()]
    if any(s in FAILED for s in states):
        return "failed"
    budget = [r for r in data["items"].values()
              if r["status"] == "skipped" and "budget" in r.get("reason", "")]
    return "partial" if budget else "ok"


def _counts(data):
    counts = {}
    for row in data.get("items", {}).values():
        counts[row["status"]] = counts.get(row["status"], 0) + 1
    return ", ".join(f"{n} {s}" for s, n in counts.items()) or "—"


def _skipped(stages):
    lines = []
    for name, (run, data, _) in stages.items():
        if run.get("skipped"):
            lines.append(f"- {name}: not started ({run['skipped']})")
            continue
        budget = [k for k, r in data.get("items", {}).items()
                  if r["status"] == "skipped" and "budget" in r.get("reason", "")]
        if budget:
            lines.append(f"- {name}: {len(budget)} item(s) for lack of time: " + "; ".join(budget))
    return lines or ["- nothing"]


def write(args):
    """Write gpu_report.md and gpu_report.json into args.out; returns 0."""
    runs = {r["name"]: r for r in _load(os.path.join(args.work, "runs.json"), [])}
    stages, sections, rows = {}, [], []
    for stage in STAGES:
        run = runs.get(stage.name, {"skipped": "never started"})
        data = _load(os.path.join(args.work, f"{stage.name}.json"), {"items": {}})
        data.setdefault("items", {})
        _settle(run, data)
        word = status(run, data)
        stages[stage.name] = (run, data, word)
        title = stage.name
        try:  # a stage module that no longer imports, or a record it did not expect: say so
            module = importlib.import_module(f"gpu_stages.{stage.name}")
            title = module.TITLE
            body, line = module.render(data), module.summary(data)
        except Exception as error:
            body, line = f"(could not render: {type(error).__name__}: {error})", "?"
        if data.get("error"):
            body = f"**Stage error:** {data['error']}\n\n{body}"
        rows.append(f"| {title} | {word} | {run.get('seconds', 0):.0f} / "
                    f"{run.get('limit_s', 0):.0f} | {_counts(data)} | {line} |")
        sections.append(f"### {title}\n\n{body}\n")
    env = stages["build"][1].get("env", {})
    head = [f"# GPU check: {env.get('device', args.device)}" + (" (--quick)" if args.quick else ""),
            "", f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; budget {args.budget_s:.0f} s, "
            f"stages done at {args.elapsed:.0f} s; driver/GPU: {env.get('nvidia_smi', '—')}; "
            f"torch {env.get('torch', '?')} (CUDA {env.get('torch_cuda', '?')}), triton "
            f"{env.get('triton', '?')}, Python {env.get('python', '?')}, nvcc {env.get('nvcc', '?')}; "
            f"tree {env.get('git') or 'unknown'}.", ""]
    summary = ["| stage | status | s used / limit | items | headline |", "|---|---|---|---|---|"] + rows
    skipped = _skipped(stages)
    markdown = "\n".join(head + ["## Summary", ""] + summary + ["", "Skipped:"] + skipped
                         + ["", "## Stages", ""] + sections)
    all_ok = all(word in ("ok", "partial") for _, _, word in stages.values())
    atomic_write(os.path.join(args.out, "gpu_report.md"), markdown)
    atomic_write_json(os.path.join(args.out, "gpu_report.json"), {
        "device": args.device, "quick": args.quick, "budget_s": args.budget_s,
        "elapsed_s": args.elapsed, "env": env, "all_ok": all_ok,
        "summary_md": "\n".join(summary + ["", "Skipped:"] + skipped),
        "stages": {name: {"status": word, "run": run, "data": data}
                   for name, (run, data, word) in stages.items()}})
    return 0
