"""Backends: the registry of ways to run the series ops, and `auto`'s choice among them per call signature.

`backend="auto"` decides once per call signature (device and its name, dtype, shapes of x and of
the terms, geometry, group size, which gradients are wanted; the batch size bucketed to a power
of two): every candidate that can run the call runs it on the call's own inputs, is checked
against a float64 computation of `reference` (`_autotune`), the ones that agree are timed, and
the fastest is kept, in memory and in a JSON cache on disk (`_cache`). `reference` is always a
candidate, so `auto` is never wrong and never slower than PyTorch's own convolutions.

It does not measure, and follows `fastpaths.static_choice` (PyTorch's own convolutions only),
when GROSS_KERNELS_AUTOTUNE=0 or `set_autotune(False)`, and under torchrun (so that every rank
runs the same backend without any collective). The public functions resolve `auto` to a concrete
name before they call the layer op (`resolve`); under torch.compile that name is chosen while
tracing (`traced_choice`) and is a constant of the compiled graph.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import platform
import time
from dataclasses import dataclass
from typing import Optional

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

from .. import _layout
from ..geometry import SeriesGeom
from . import _autotune, _cache, fastpaths
from .base import Backend, Needs
from .compiled import Compiled
from .reference import Reference
from .triton import Triton

# The names `backend=` has always accepted; `available_backends()` lists these.
PUBLIC = ("reference", "cpp", "triton", "cuda")


class BackendUnavailableError(RuntimeError):
    """A backend was forced (`backend="..."`) but cannot run these tensors here."""


_REGISTRY: dict = {}


def register(backend: Backend) -> Backend:
    """Add `backend` to the registry: `auto` tries it, `backend=backend.name` forces it."""
    if not isinstance(backend, Backend):
        raise TypeError(f"backend must be a gross_kernels.backends.base.Backend, got {type(backend).__name__}")
    if not backend.name or backend.name == "auto":
        raise ValueError(f"backend.name must be a non-empty name other than 'auto', got {backend.name!r}")
    _REGISTRY[backend.name] = backend
    return backend


def unregister(name: str) -> None:
    """Remove a registered backend (and every decision that chose it)."""
    _REGISTRY.pop(name, None)
    for signature in [s for s, d in _DECISIONS.items() if d.winner == name]:
        del _DECISIONS[signature]


for _backend in (Reference(), fastpaths.ChannelsLast(), fastpaths.Folded(), Compiled("cpp"),
                 Compiled("cuda"), Triton()):
    register(_backend)


def get(name: str) -> Backend:
    """The registered backend `name`."""
    return _REGISTRY[check_name(name)]


def check_name(backend) -> str:
    """The backend must be 'auto' or a registered name."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")
    if backend != "auto" and backend not in _REGISTRY:
        raise ValueError(f"backend must be one of {('auto',) + tuple(_REGISTRY)}, got {backend!r}")
    return backend


def unavailable_reason(name: str, device: torch.device, dtype: torch.dtype) -> Optional[str]:
    """Why backend `name` cannot run tensors of this device and dtype (None if it can)."""
    return _REGISTRY[check_name(name)].unavailable_reason(torch.device(device), dtype)


def available_backends(device=None) -> list:
    """Public backends that can run on this machine (on `device` if given, else on any local device)."""
    devices = [torch.device(device)] if device is not None else [torch.device("cpu")] + (
        [torch.device("cuda")] if torch.cuda.is_available() else [])
    return [name for name in PUBLIC
            if any(unavailable_reason(name, d, torch.float32) is None for d in devices)]


def check_available(backend: str, device: torch.device, dtype: torch.dtype) -> Backend:
    """The forced backend `backend`; raises BackendUnavailableError if it cannot run here."""
    reason = unavailable_reason(backend, device, dtype)
    if reason is not None:
        raise BackendUnavailableError(f"backend={backend!r} is unavailable: {reason}")
    return _REGISTRY[backend]


# ---------------------------------------------------------------- signatures -------------------

@functools.lru_cache(maxsize=None)
def device_name(device: torch.device) -> str:
    """The device's model name: the GPU's, or the CPU's from /proc/cpuinfo where there is one."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _batch_bucket(n):
    # Decisions are shared by batch sizes within a factor of two (a short last batch included).
    return None if n is None else 1 << (n - 1).bit_length()



@dataclass(frozen=True)
class Signature:
    """What `auto` decides per: the op, device, dtype, shapes, geometry and wanted gradients."""

    op: str              # "series" or "bottleneck"
    device: str          # device type and model name, e.g. "cuda:NVIDIA H200"
    dtype: str
    batch: int           # the batch size's power-of-two bucket
    x: tuple             # (C, H, W) of x
    channels_last: bool
    S: int
    T: int
    C_out: int           # 0 for the series op
    kernel: tuple
    bias: bool
    geom: SeriesGeom
    needs: Needs
    threads: int         # intra-op threads on the CPU (0 on a GPU)

    @property
    def device_type(self) -> str:
        return self.device.split(":", 1)[0]

    def key(self) -> str:
        """A compact, stable text form (the disk cache's key)."""
        g = self.geom
        shape = "x".join(map(str, (self.batch, *self.x)))
        parts = [self.op, self.device, self.dtype, f"N{shape}", "cl" if self.channels_last else "nchw",
                 f"S{self.S}T{self.T}O{self.C_out}", "k" + "x".join(map(str, self.kernel)),
                 "bias" if self.bias else "nobias", "gs" + ",".join(map(str, g.group_sizes)),
                 f"G{g.group_size}", "s{}p{}d{}".format(*(",".join(map(str, v)) for v in g.conv)),
                 "needs" + "".join("1" if n else "0" for n in self.needs), f"t{self.threads}"]
        return "|".join(parts)

    def describe(self) -> str:
        """A short human-readable form for reports and warnings."""
        mode = ("inference" if not self.needs.any else
                "train" if self.needs.x else "train, x frozen")
        size = ("any size" if self.batch is None else
                f"N≤{self.batch} @{self.x[1]}x{self.x[2]}")  # traced: sizes left out
        return (f"{self.op} {self.dtype} {size} {self.x[0]}→{self.C_out or self.T} "
                f"S{self.S}/T{self.T} G={self.geom.group_size} s{self.geom.stride[0]} {mode}")


def _size(d):
    # A symbolic size (a fake kernel under dynamic shapes) is unknown to a signature: None.
    return d if isinstance(d, int) else None


def _signature(op, device, dtype, shape, channels_last, S, T, C_out, kernel, bias, geom, needs):
    return Signature(op, f"{device.type}:{device_name(device)}", str(dtype).split(".")[-1],
                     _batch_bucket(_size(shape[0])), tuple(_size(d) for d in shape[1:]),
                     channels_last, _size(S), _size(T), _size(C_out),
                     tuple(_size(k) for k in kernel), bias, geom, needs,
                     torch.get_num_threads() if device.type == "cpu" else 0)


def _channels_last(x) -> bool:
    return _layout.format_of(x) is torch.channels_last


def signature(op, x, cores, geom, needs, firsts=None, lasts=None, bias=None) -> Signature:
    """The dispatch signature of one call (`firsts`, `lasts`: the layer op's 1×1 terms)."""
    T, _, kh, kw = cores[0].shape
    return _signature(op, x.device, x.dtype, x.shape, _channels_last(x),
                      firsts[0].shape[0] if firsts is not None else x.shape[1], T,
                      lasts[0].shape[0] if lasts is not None else 0, (kh, kw), bias is not None,
                      geom, Needs(*needs))


# ---------------------------------------------------------------- the choice -------------------

_DECISIONS: dict = {}   # Signature -> _autotune.Decision, in the order first seen
_SETTINGS = {"autotune": None}


def set_autotune(enabled: Optional[bool]) -> None:
    """Measure candidates per signature (True), follow the static rule (False), or follow
    GROSS_KERNELS_AUTOTUNE (None, the default: measure unless it is 0). Clears the decisions."""
    if enabled is not None and not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool or None, got {type(enabled).__name__}")
    _SETTINGS["autotune"] = enabled
    reset()


def autotune_enabled() -> bool:
    """Whether `auto` measures (see `set_autotune`)."""
    if _SETTINGS["autotune"] is not None:
        return _SETTINGS["autotune"]
    return os.environ.get("GROSS_KERNELS_AUTOTUNE", "1").strip() != "0"


def reset() -> None:
    """Forget every decision made in this process (the disk cache is kept)."""
    _DECISIONS.clear()


def _distributed() -> bool:
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def candidates(sig: Signature, device: torch.device, dtype: torch.dtype) -> list:
    """The registered backends `auto` may try for this signature, `reference` first."""
    return [b for b in _REGISTRY.values()
            if b.tunes_on(device) and b.applies(sig) and b.unavailable_reason(device, dtype) is None]


def _static(sig: Signature, source: str) -> _autotune.Decision:
    return _autotune.Decision(fastpaths.static_choice(sig), source)


def _decide(sig, device, dtype, inputs) -> Optional[_autotune.Decision]:
    """A decision for a signature not seen yet in this process (None: decide again next call)."""
    if not autotune_enabled():
        return _static(sig, "static")
    if _distributed():
        return _static(sig, "static (torchrun)")
    cached, runnable = _cache.lookup(sig), candidates(sig, device, dtype)
    if cached is not None and cached.winner == "reference":
        return cached  # the oracle itself: nothing to check
    if cached is not None and cached.winner in {b.name for b in runnable}:
        # Re-checked on this process's inputs before it is trusted.
        start = time.perf_counter()
        checked = _autotune.measure(sig, [_REGISTRY["reference"], _REGISTRY[cached.winner]],
                                    inputs, time_them=False)
        if checked is not None and checked.candidates[cached.winner].verdict == "ok":
            cached.seconds = time.perf_counter() - start
            return cached
    start = time.perf_counter()
    decision = _autotune.measure(sig, runnable, inputs)
    if decision is not None:
        decision.seconds = time.perf_counter() - start
        _cache.store(sig, decision)
    return decision


def choose(backend: str, op: str, x, cores, geom: SeriesGeom, needs: Needs, firsts=None,
           lasts=None, bias=None, measure: bool = True) -> Backend:
    """The backend that runs this call: the forced one, or `auto`'s decision for its signature
    (`firsts`, `lasts`: the layer op's 1×1 terms). With `measure=False` (fake tensors: nothing
    can run), or under a dispatch mode (opcheck, FLOP counters: timing would measure the mode), an
    undecided signature gets the static rule's backend and stays undecided."""
    if backend != "auto":
        return check_available(backend, x.device, x.dtype)
    sig = signature(op, x, cores, geom, needs, firsts, lasts, bias)
    decision = _DECISIONS.get(sig)
    if decision is None:
        if not measure or _get_current_dispatch_mode() is not None:  # nothing to time there
            return _REGISTRY[fastpaths.static_choice(sig)]
        decision = _decide(sig, x.device, x.dtype,
                           _autotune.Inputs.of(op, x, cores, geom, needs, firsts, lasts, bias))
        if decision is None:  # non-finite inputs: nothing can be verified on them
            return _REGISTRY["reference"]
        _DECISIONS[sig] = decision
    return _REGISTRY[decision.winner]


def _is_fake(t) -> bool:
    return isinstance(t, torch._subclasses.FakeTensor) or t.device.type == "meta"


def _without_sizes(sig: Signature) -> Signature:
    """The signature with x's batch and spatial sizes left out (they may be dynamic)."""
    return dataclasses.replace(sig, batch=None, x=(sig.x[0], None, None))


def _layer_choice(sig: Signature) -> Backend:
    """The backend of a layer call whose sizes are left out: what this process decided for that
    layer (one backend at every size seen), else `reference`; recorded (for the report, and so
    that every later trace of the layer gets the same)."""
    key = _without_sizes(sig)
    decision = _DECISIONS.get(key)
    if decision is None:
        winners = {d.winner for s, d in _DECISIONS.items() if _without_sizes(s) == key}
        decision = _autotune.Decision(winners.pop() if len(winners) == 1 else "reference",
                                      "traced")
        _DECISIONS[key] = decision
    return _REGISTRY[decision.winner]


def layer_op_choice(backend: str, x) -> Backend:
    """The backend the layer op runs for its `backend` argument. The public function passes a
    concrete name; "auto" given to the op directly runs `reference`, the one choice its fake and
    real kernels agree on whatever the sizes (dynamic ones included)."""
    return _REGISTRY["reference"] if backend == "auto" else check_available(backend, x.device,
                                                                            x.dtype)


@torch.compiler.assume_constant_result
def traced_choice(device_type, index, dtype, channels_last, C_in, S, T, C_out, kernel, bias, geom,
                  needs) -> str:
    """`auto`'s backend for a layer call that torch.compile traces, from what stays constant when
    sizes are dynamic (`_layer_choice`). The name is baked into the compiled graph, so the compiled
    call runs what its graph (and a compiled-graph cache) expects."""
    device = torch.device(device_type, index) if index is not None else torch.device(device_type)
    sig = _signature("bottleneck", device, dtype, (None, C_in, None, None), channels_last, S, T,
                     C_out, kernel, bias, SeriesGeom(*geom), Needs(*needs))
    return _layer_choice(sig).name


def resolve(backend: str, op: str, x, cores, geom, needs, firsts=None, lasts=None,
            bias=None) -> str:
    """The backend name a public op call passes to its op. The layer op gets a concrete name (so
    its forward, backward and fake kernels, whose saved activations depend on it, see one); the
    series op keeps "auto" under torch.compile (its outputs do not depend on the backend, and its
    tensors' sizes may be dynamic there), and its implementation decides."""
    if backend != "auto":
        return backend
    if _is_fake(x):  # shapes only (e.g. gross.count_macs): nothing can run
        return choose(backend, op, x, cores, geom, needs, firsts, lasts, bias, measure=False).name
    if torch.compiler.is_compiling():
        if op == "series":
            return backend
        T, _, kh, kw = cores[0].shape
        return traced_choice(x.device.type, x.device.index, x.dtype, _channels_last(x),
                             firsts[0].shape[1], firsts[0].shape[0], T, lasts[0].shape[0], (kh, kw),
                             bias is not None, (geom.group_sizes, geom.group_size, geom.stride,
                                                geom.padding, geom.dilation), tuple(needs))
    return choose(backend, op, x, cores, geom, needs, firsts, lasts, bias).name


def dispatch_report(show: bool = True) -> list:
    """The decisions `auto` made in this process, one dict per signature (signature, source,
    winner, candidates with their times and verdicts, seconds spent deciding); printed as a
    markdown table when `show`."""
    rows = [{"signature": sig.describe(), "key": sig.key(), **decision.to_json()}
            for sig, decision in _DECISIONS.items()]
    if show:
        print(_autotune.format_report(rows))
    return rows
