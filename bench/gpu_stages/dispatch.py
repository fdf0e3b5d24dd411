"""Stage 4: what `auto` chose per call signature, as `gk.dispatch_report()` (issue 13) records it.

`auto` meets the signatures of a VGG-16 CIFAR search-space training step (one step at every
group size, as gross.train runs it, and an inference forward) and of the kernel benchmark's
VGG-16 CIFAR layers (float32 and bfloat16, forward and forward+backward, smallest and largest
group size); the report's rows (signature, candidates with times and verdicts, winner) are
recorded after every item.
"""
from __future__ import annotations

import json

import torch

import gross_kernels as gk

TITLE = "4. What auto chose per signature (gk.dispatch_report())"


def _vgg_training(ctx):
    """(keys, callables): one search-space training step of VGG-16 CIFAR per group-size level
    (gross.train's precision and trainable set), then an inference forward."""
    from gpu_stages import throughput

    batch, res = (2, 32) if ctx.quick else (128, 32)
    model = throughput.build("vgg16_cifar", "auto", ctx.device)
    step, _ = throughput.training_step("vgg16_cifar", model, ctx.device, batch, res)
    plan = [(f"VGG-16 CIFAR training step at group sizes {sorted(set(config.values()))}",
             lambda config=config: step(config)) for config in throughput.levels(model)]

    def inference():
        model.eval()
        with torch.no_grad():
            model(torch.randn(batch, 3, res, res, device=ctx.device))

    return plan + [("VGG-16 CIFAR inference forward", inference)]


def _layer_calls(ctx):
    """(keys, callables): the kernel benchmark's VGG-16 CIFAR layers, forward and forward+backward
    at their smallest and largest group size, in float32 and (on the GPU) bfloat16."""
    from cases import distinct_layers, make_tensors, runner, tiny

    layers = distinct_layers("vgg16-cifar")
    layers = [tiny(layers[0])] if ctx.quick else layers
    dtypes = [torch.float32] + ([torch.bfloat16] if ctx.device.type == "cuda" else [])

    def calls(layer, dtype):
        tensors = make_tensors(layer, ctx.device, dtype)
        for group_size in layer.extremes():
            for pass_ in ("fwd", "fwd+bwd"):
                runner("auto", layer, tensors, group_size, pass_)()

    return [(f"{layer.title} {str(dtype).removeprefix('torch.')}",
             lambda layer=layer, dtype=dtype: calls(layer, dtype))
            for layer in layers for dtype in dtypes]


def run(ctx):
    """Meet the signatures with `auto`, then record gk.dispatch_report() after each item."""
    plan = _vgg_training(ctx) + _layer_calls(ctx)
    ctx.plan(key for key, _ in plan)
    # A relaunched stage (after a crash) skips the items recorded: keep the rows they decided.
    rows = {row["key"]: row for row in ctx.data.get("rows", [])}
    for key, call in plan:
        ctx.item(key, call)
        # Recorded as it grows: a stage cut by its time limit keeps the decisions made so far.
        rows.update((row["key"], row) for row in gk.dispatch_report(show=False))
        ctx.set("rows", json.loads(json.dumps(list(rows.values()), default=str)))


def _cell(value):
    """A report value in one table cell, whatever its shape (str, number, list, dict)."""
    if isinstance(value, dict):
        return "; ".join(f"{k}: {_cell(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return "; ".join(_cell(v) for v in value)
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value).replace("|", "/")


def render(data):
    """The report's rows as a table, whatever their fields."""
    rows = data.get("rows")
    if not rows:
        return "No dispatch decisions were recorded."
    head = list(dict.fromkeys(k for row in rows for k in row))
    return "\n".join([f"{len(rows)} signatures.", "", "| " + " | ".join(head) + " |",
                      "|" + "---|" * len(head)]
                     + ["| " + " | ".join(_cell(row.get(k, "")) for k in head) + " |"
                        for row in rows])


def summary(data):
    """One line: how many signatures, which winners."""
    rows = data.get("rows") or []
    winners = {}
    for row in rows:
        winner = str(row.get("winner", "?"))
        winners[winner] = winners.get(winner, 0) + 1
    return (f"{len(rows)} signatures; winners: "
            + ", ".join(f"{w} ×{n}" for w, n in winners.items())) if rows else "no decisions"
