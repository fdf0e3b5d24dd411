"""`auto`'s measurement: each candidate runs the call's own inputs, is checked against a float64
computation, and the ones that agree are timed.

A candidate is admitted when, for the output and (in a training call) every gradient the call
wants, its error against `reference` run in float64 is at most twice the error of `reference` run
in the call's own dtype, plus a floor (`FLOORS`); errors are max |difference| / max |float64 value|.
The training check backpropagates a random output gradient (from a private generator: the global
random stream is left untouched). Admitted candidates are timed round-robin (CUDA events on a
GPU) and the one with the lowest median wins.
"""
from __future__ import annotations

import functools
import statistics
import time
import warnings
from dataclasses import dataclass, field
from typing import NamedTuple, Optional

import torch

from .. import _layout
from ..algebra import sum_active

# Error floor per dtype, relative to the largest float64 value: what agreeing within rounding of
# that dtype allows on top of twice the same-dtype reference's own error.
FLOORS = {torch.float64: 1e-9, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
REPEATS = {"cpu": 7, "cuda": 10}
# Fast calls get more repeats (up to this many), as long as a decision stays within about 0.1 s.
_MAX_REPEATS, _TIMING_BUDGET_MS = 21, 100.0
# A candidate slower than this many times the fastest one after the first round is not timed again.
_HOPELESS = 3.0
# Another backend replaces `reference` only when its median is at least 4 % lower, in two
# timings: near a tie, or after one burst of load, the choice would follow the noise (two identical
# columns of bench/ops.py differ by up to 10 % on this project's VM).
_MARGIN = 0.96


class Inputs(NamedTuple):
    """One call's tensors at the kernel level (A, C: the summed 1×1 factors; None for the series op)."""

    op: str
    x: torch.Tensor
    cores: list
    geom: object
    needs: object
    A: Optional[torch.Tensor] = None
    C: Optional[torch.Tensor] = None
    bias: Optional[torch.Tensor] = None

    @classmethod
    def of(cls, op, x, cores, geom, needs, firsts=None, lasts=None, bias=None) -> "Inputs":
        """The kernel-level inputs of a public op's call (the active 1×1 terms summed)."""
        n = geom.num_active
        return cls(op, x, list(cores), geom, needs,
                   None if firsts is None else sum_active(firsts, n),
                   None if lasts is None else sum_active(lasts, n), bias)

    def cast(self, dtype):
        """The same call in another dtype (detached copies)."""
        def c(t):
            return None if t is None else t.detach().to(dtype)
        return self._replace(x=c(self.x), cores=[c(t) for t in self.cores], A=c(self.A),
                             C=c(self.C), bias=c(self.bias))


@dataclass
class Verdict:
    """How one candidate fared: "ok", "rejected" (disagrees), "error" (raised), "untimed"."""

    verdict: str
    error: Optional[float] = None
    ms: Optional[float] = None
    detail: str = ""


@dataclass
class Decision:
    """The backend chosen for a signature, how ("measured", "cache", "static", ...), and why."""

    winner: str
    source: str
    candidates: dict = field(default_factory=dict)
    seconds: float = 0.0

    def to_json(self) -> dict:
        return {"winner": self.winner, "source": self.source, "seconds": round(self.seconds, 4),
                "candidates": {n: vars(v) for n, v in self.candidates.items()}}

    @classmethod
    def from_json(cls, record: dict, source: str) -> "Decision":
        return cls(record["winner"], source,
                   {n: Verdict(**v) for n, v in record.get("candidates", {}).items()})


def _errors(outputs, oracle) -> list:
    if len(outputs) != len(oracle):
        raise ValueError(f"returned {len(outputs)} tensors where {len(oracle)} were wanted")
    errors = []
    for out, want in zip(outputs, oracle):
        scale = want.abs().max().item()
        diff = (out.to(want.dtype) - want).abs().max().item()
        errors.append(diff / scale if scale > 0 else diff)
    return errors


def _synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_round(fns: dict, device) -> dict:
    """Milliseconds of one call of each function (CUDA events on a GPU)."""
    out = {}
    for name, fn in fns.items():
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            out[name] = (start, end)
        else:
            t0 = time.perf_counter()
            fn()
            out[name] = (time.perf_counter() - t0) * 1e3
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        out = {name: s.elapsed_time(e) for name, (s, e) in out.items()}
    return out


def _timings(fns: dict, device, repeats: int) -> dict:
    """Median ms per function, round-robin (each round starts at another one); hopeless ones drop out."""
    times = {name: [] for name in fns}
    names = list(fns)
    r = 0
    while r < repeats:
        order = names[r % len(names):] + names[:r % len(names)]
        for name, ms in _time_round({n: fns[n] for n in order}, device).items():
            times[name].append(ms)
        if r == 0:
            best = min(t[0] for t in times.values())
            names = [n for n in names if times[n][0] <= _HOPELESS * best]
            round_ms = sum(times[n][0] for n in names)
            repeats = max(repeats, min(_MAX_REPEATS, int(_TIMING_BUDGET_MS / max(round_ms, 1e-3))))
        r += 1
    return {name: statistics.median(t) for name, t in times.items()}


def measure(sig, backends: list, inputs: Inputs, time_them: bool = True) -> Optional[Decision]:
    """Check every backend on `inputs` against float64 `reference`, time those that agree, pick the
    fastest. `backends[0]` must be the reference. None when the float64 output is not finite."""
    reference, device, dtype = backends[0], inputs.x.device, inputs.x.dtype
    with torch.no_grad():
        grad_out = None
        if inputs.needs.any:
            kh, kw = inputs.cores[0].shape[2:]
            shape = (inputs.x.shape[0], inputs.C.shape[0] if inputs.op == "bottleneck"
                     else inputs.cores[0].shape[0], *inputs.geom.output_hw(inputs.x.shape[2:], (kh, kw)))
            gen = torch.Generator(device=device).manual_seed(0)
            grad_out = torch.randn(shape, generator=gen, device=device, dtype=dtype)
            grad_out = grad_out.contiguous(memory_format=_layout.format_of(inputs.x))
        precise = inputs.cast(torch.float64)
        oracle = reference.step(precise, None if grad_out is None else grad_out.double())
        if not all(torch.isfinite(t).all() for t in oracle):
            return None
        floor = FLOORS.get(dtype, 2e-2)
        own = _errors(reference.step(inputs, grad_out), oracle)  # its failure is the call's
        verdicts = {reference.name: Verdict("ok", max(own))}
        runnable = {reference.name: functools.partial(reference.step, inputs, grad_out)}
        for backend in backends[1:]:
            if backend.name in verdicts:
                continue
            try:
                errors = _errors(backend.step(inputs, grad_out), oracle)
            except Exception as error:  # noqa: BLE001 - any failure excludes the candidate
                verdicts[backend.name] = Verdict("error", detail=f"{type(error).__name__}: {error}")
                _warn(backend.name, sig, verdicts[backend.name].detail)
                continue
            worst = max(errors)
            bad = [i for i, (e, r) in enumerate(zip(errors, own)) if not e <= 2 * r + floor]
            if bad:
                what = ["output"] + [f"gradient {i}" for i in range(1, len(errors))]
                detail = (f"{what[bad[0]]} differs from float64 by {errors[bad[0]]:.2e} "
                          f"(reference in {str(dtype).split('.')[-1]}: {own[bad[0]]:.2e})")
                verdicts[backend.name] = Verdict("rejected", worst, detail=detail)
                _warn(backend.name, sig, detail)
                continue
            verdicts[backend.name] = Verdict("ok", worst)
            runnable[backend.name] = functools.partial(backend.step, inputs, grad_out)
        if not time_them or len(runnable) == 1:
            winner = next(iter(runnable))
        else:
            if device.type == "cuda":
                _time_round(runnable, device)  # one more untimed round: lazy compilation, caches
            repeats = REPEATS.get(device.type, 5)
            times = _timings(runnable, device, repeats)
            for name, ms in times.items():
                verdicts[name].ms = ms
            winner = min(times, key=times.get)
            if times[winner] > _MARGIN * times[reference.name]:
                winner = reference.name
            else:  # a second timing of the two must agree: one burst of load must not decide
                pair = [winner, reference.name]
                again = _timings({n: runnable[n] for n in pair}, device, repeats)
                for name in pair:
                    verdicts[name].detail = f"again {again[name]:.3f} ms"
                if again[winner] > _MARGIN * again[reference.name]:
                    winner = reference.name
    return Decision(winner, "measured" if time_them else "checked", verdicts)


def _warn(name, sig, detail):
    warnings.warn(f"gross_kernels auto: backend {name!r} excluded for [{sig.describe()}]: {detail}",
                  RuntimeWarning, stacklevel=2)


def format_report(rows) -> str:
    """A markdown table of `dispatch_report` rows, with the total time spent deciding."""
    lines = ["| signature | winner | source | candidates (median ms, verdict) | decide s |",
             "|---|---|---|---|---:|"]
    for row in rows:
        cells = []
        for name, v in row["candidates"].items():
            ms = f"{v['ms']:.3f} ms" if v.get("ms") is not None else ""
            again = f" ({v['detail']})" if v["verdict"] == "ok" and v.get("detail") else ""
            cells.append(f"{name} {ms} {v['verdict']}{again}".replace("  ", " "))
        lines.append(f"| {row['signature']} | {row['winner']} | {row['source']} | "
                     f"{'; '.join(cells)} | {row['seconds']:.2f} |")
    total = sum(row["seconds"] for row in rows)
    lines.append(f"\n{len(rows)} signatures, {total:.1f} s spent deciding")
    return "\n".join(lines)
