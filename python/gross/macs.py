"""Exact multiply-accumulate counts of Conv2d, Linear and SeriesConv2d layers for one input (C, H, W)."""
import math

import torch
import torch.nn as nn
from torch._subclasses.fake_tensor import FakeTensorMode

from gross_kernels import SeriesConv2d


def _conv_macs(conv, out_shape):
    # Every output element is a dot product over (C_in / groups) · kh · kw inputs.
    kh, kw = conv.kernel_size
    return math.prod(out_shape) * (conv.in_channels // conv.groups) * kh * kw


def _layer_macs(module, x, y):
    if isinstance(module, SeriesConv2d):
        return module.macs(tuple(x.shape[-2:]))
    if isinstance(module, nn.Conv2d):
        return _conv_macs(module, y.shape[1:])
    return math.prod(y.shape[1:]) * module.in_features  # nn.Linear


def _check_input_size(input_size):
    if (not isinstance(input_size, (tuple, list)) or len(input_size) != 3
            or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in input_size)):
        raise ValueError(f"input_size must be three positive ints (C, H, W), got {input_size!r}")
    return tuple(input_size)


def count_macs(model, input_size, per_layer=False):
    """MACs of one forward pass of one input of shape input_size = (C, H, W) at the active configuration.

    Counts Conv2d, Linear and SeriesConv2d (its three convolutions at the active group size);
    biases, pooling and activations are not counted. The forward runs on fake tensors, so no
    real compute happens. With per_layer=True returns (total, rows), one row per layer call.
    """
    input_size = _check_input_size(input_size)
    rows = []

    def hook(module, inputs, output):
        rows.append({
            "layer": names[module],
            "type": type(module).__name__,
            "input": tuple(inputs[0].shape[1:]),
            "output": tuple(output.shape[1:]),
            "group_size": getattr(module, "group_size", None),
            "macs": _layer_macs(module, inputs[0], output),
        })

    counted = (nn.Conv2d, nn.Linear, SeriesConv2d)
    names = {m: name for name, m in model.named_modules() if isinstance(m, counted)}
    handles = [m.register_forward_hook(hook) for m in names]
    was_training = model.training
    model.eval()
    try:
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        with torch.no_grad(), FakeTensorMode(allow_non_fake_inputs=True):
            model(torch.empty((1, *input_size), dtype=dtype, device=device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    total = sum(row["macs"] for row in rows)
    return (total, rows) if per_layer else total


def format_table(rows):
    """A markdown table of count_macs(..., per_layer=True) rows, with a total line."""
    lines = ["| layer | type | input | output | group size | MACs |", "|---|---|---|---|---|---:|"]
    for r in rows:
        size = "" if r["group_size"] is None else r["group_size"]
        shape_in = "×".join(map(str, r["input"]))
        shape_out = "×".join(map(str, r["output"]))
        lines.append(f"| {r['layer']} | {r['type']} | {shape_in} | {shape_out} | {size} | {r['macs']:,} |")
    lines.append(f"| **total** | | | | | {sum(r['macs'] for r in rows):,} |")
    return "\n".join(lines)
