"""Whole models: `convert` replaces the convolutions a spec names by their group-size series."""
from __future__ import annotations

import copy

from torch import nn

from .layer import _new_series_layer, _series_jobs, _series_layers
from .weight import check_weight


def _spec_entry(name, entry):
    if not isinstance(entry, dict) or "group_sizes" not in entry:
        raise TypeError(f"spec[{name!r}] must be a dict with 'group_sizes' (and optional 'bottleneck'), "
                        f"got {entry!r}")
    unknown = set(entry) - {"group_sizes", "bottleneck"}
    if unknown:
        raise ValueError(f"spec[{name!r}] has unknown keys {sorted(unknown)}")
    bottleneck = entry.get("bottleneck")
    if isinstance(bottleneck, list):
        bottleneck = tuple(bottleneck)
    return list(entry["group_sizes"]), bottleneck


def replace_module(model, name, module):
    """Put `module` in `model` in place of its submodule `name` (a dotted name from named_modules)."""
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, module)


def convert(model, spec, inplace=True, init="decompose", progress=True, device=None, tol=1e-5, max_iter=500,
            method="pci", workers=1):
    """Replace the Conv2d layers named in `spec` by their group-size series; returns the model.

    `spec` maps names from `model.named_modules()` to `{"group_sizes": [...], "bottleneck": S |
    [S, T] | None}`. `init="decompose"` fits each layer's series by BTD (on `device` if given),
    with a progress bar over the layers (moving as each layer's sizes finish); `workers` > 1 runs
    the BTDs (one per layer and size) in that many CPU processes, largest layers first (call it
    under `if __name__ == "__main__":`, as spawned processes re-import the main module).
    `init="random"` builds SeriesConv2d layers with their default random initialisation, without
    decomposing. `inplace=False` converts a deep copy. `tol`, `max_iter`, `method` go to `btd`.
    Errors name the offending layer; all layers are checked before any is decomposed.
    """
    if init not in ("decompose", "random"):
        raise ValueError(f"init must be 'decompose' or 'random', got {init!r}")
    if not isinstance(spec, dict):
        raise TypeError(f"spec must be a dict of layer name → settings, got {type(spec).__name__}")
    if not inplace:
        model = copy.deepcopy(model)
    modules = dict(model.named_modules())
    for name in spec:
        if name not in modules:
            raise ValueError(f"spec names layer {name!r}, which is not in the model")
        if not isinstance(modules[name], nn.Conv2d):
            raise TypeError(f"layer {name!r} is a {type(modules[name]).__name__}, not an nn.Conv2d")
    plans = {}
    for name in spec:
        group_sizes, bottleneck = _spec_entry(name, spec[name])
        try:
            plans[name] = _series_jobs(modules[name], group_sizes, bottleneck, tol=tol, max_iter=max_iter,
                                       method=method, device=device)
            if init == "decompose":
                check_weight(modules[name].weight)
        except (ValueError, TypeError) as exc:
            raise type(exc)(f"layer {name!r}: {exc}") from exc
    if init == "decompose":
        built = _series_layers(modules, plans, workers, progress)
    for name, (pair, sizes, _) in plans.items():
        layer = built[name][0] if init == "decompose" else _new_series_layer(modules[name], pair, sizes)
        replace_module(model, name, layer)
    return model

