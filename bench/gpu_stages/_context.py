"""What a stage sees in its own process: device, mode, deadline, and a durable record of its items.

A stage runs its work as items (`StageContext.item`): each is timed, its result or error kept, and
the stage's record (a JSON file the parent reads) rewritten after every item, so that a process
that dies or is killed mid-stage loses only the item it was running. The record names the item
in flight ("current"), which lets the parent mark it and start the stage again: items already
recorded are not run twice.
"""
from __future__ import annotations

import json
import os
import time
import traceback

import torch

from gpu_stages import BROKEN_CONTEXT
from gross_kernels.files import atomic_write_json


class StageError(Exception):
    """Raised by a stage that cannot run at all (the message is the stage's recorded error)."""


class StageContext:
    """The stage's device, mode and deadline, and its record at `path` (resumed if it exists)."""

    def __init__(self, path, device, quick, deadline, out, root):
        self.path, self.device, self.quick, self.out, self.root = path, device, quick, out, root
        self.deadline = deadline
        self.data = {"items": {}, "planned": [], "current": None}
        if os.path.exists(path):
            with open(path) as f:
                self.data = json.load(f)

    def left(self):
        """Seconds until this stage must have finished."""
        return self.deadline - time.time()

    def save(self):
        atomic_write_json(self.path, self.data)

    def set(self, key, value):
        """Record a stage-level result (JSON-able)."""
        self.data[key] = value
        self.save()

    def plan(self, keys):
        """Declare the items this stage means to run, so that those never reached are reported."""
        self.data["planned"] = list(dict.fromkeys(keys))
        self.save()

    def _estimate(self):
        ran = [r["seconds"] for r in self.data["items"].values() if "seconds" in r]
        return sum(ran) / len(ran) if ran else 0.0

    def item(self, key, fn, estimate_s=None):
        """Run fn() -> dict once and record it under `key`; returns the record (None if skipped).

        Skipped without running when already recorded (a resumed stage) or when fewer seconds are
        left than `estimate_s` (default: the mean of this stage's items so far). The record has
        "status": "ok", "fail" (fn returned ok=False), "error" (fn raised), or "skipped" (time).
        """
        items = self.data["items"]
        if key in items:
            return items[key]
        estimate = self._estimate() if estimate_s is None else estimate_s
        if self.left() < estimate:
            items[key] = {"status": "skipped", "reason": f"time budget ({self.left():.0f} s left, "
                                                          f"~{estimate:.0f} s needed)"}
            self.save()
            return None
        self.data["current"] = key
        self.save()
        start = time.time()
        try:
            row = dict(fn() or {})
            row["status"] = "ok" if row.get("ok", True) else "fail"
        except Exception as error:  # recorded with the item; the next item still runs
            row = {"status": "error", "error": f"{type(error).__name__}: {error}"[:600],
                   "traceback": traceback.format_exc()[-3000:]}
            print(row["traceback"], flush=True)
        row["seconds"] = round(time.time() - start, 3)
        items[key] = row
        self.data["current"] = None
        self.save()
        if row["status"] == "error" and not _cuda_healthy(self.device):
            os._exit(BROKEN_CONTEXT)
        return row


def _cuda_healthy(device):
    """False when the CUDA context can no longer run work (an earlier kernel faulted)."""
    if device.type != "cuda":
        return True
    try:
        torch.ones(1, device=device).add_(1)
        torch.cuda.synchronize(device)
        return True
    except Exception:  # a sticky CUDA error: this process can do no more GPU work
        return False
