"""Decomposition specs: the paper's, `auto` for any model, or the user's mapping; checked against the model; listed as YAML.

A spec maps module names to `{"group_sizes": [...], "bottleneck": S | [S, T]}` (see
`gross.convert`). `auto` takes every k×k convolution (k > 1) with groups == 1 and enough
channels, a bottleneck of a ratio of C_in, and the group sizes of a nested chain that divide it;
convolutions it leaves alone (grouped, depthwise, too narrow, …) are listed with the reason.
"""
import fnmatch
import json
import os
from collections.abc import Mapping

from torch import nn

from gross import models
from gross.decompose import convert
from gross.decompose.layer import conv_padding
from gross.macs import count_macs
from gross.settings import yaml_load

NAMED = ("auto", "default", "high_compression")


def _is_kxk(conv):
    return isinstance(conv, nn.Conv2d) and max(conv.kernel_size) > 1


def _why_not(name, conv, called, settings):
    """Why `auto` leaves `conv` alone (None: it decomposes it)."""
    if conv.groups == conv.in_channels and conv.groups > 1:
        return f"depthwise (groups={conv.groups}): already grouped"
    if conv.groups != 1:
        return f"grouped (groups={conv.groups}): already grouped"
    if name not in called:
        return "not run by the forward pass"
    if conv.padding_mode != "zeros":
        return f"padding_mode={conv.padding_mode!r} (the series pads with zeros)"
    try:
        conv_padding(conv)
    except ValueError as err:
        return str(err)
    if min(conv.in_channels, conv.out_channels) < settings.min_channels:
        return (f"{conv.in_channels}→{conv.out_channels} channels: fewer than "
                f"decompose.auto.min_channels={settings.min_channels}")
    return None


def _chain(settings, bottleneck):
    """The group sizes of the configured chain that are at most the maximum and divide the bottleneck."""
    if settings.group_sizes is not None:
        sizes = settings.group_sizes
    else:
        sizes = [2 ** k for k in range(settings.max_group_size.bit_length())]
    return [g for g in sizes if g <= settings.max_group_size and bottleneck % g == 0]


def auto_spec(model, input_size, settings):
    """(spec, left alone) for `model` at one input of `input_size`, under `settings` (a settings.AutoSpecSettings).

    `left alone` maps each k×k convolution that was considered but not decomposed to the reason,
    and counts 1×1 convolutions under the key "1×1" (nothing to decompose there).
    """
    called = {row["layer"] for row in count_macs(model, input_size, per_layer=True)[1]}
    spec, left, pointwise = {}, {}, 0
    for name, conv in model.named_modules():
        if not isinstance(conv, nn.Conv2d):
            continue
        if not any(fnmatch.fnmatchcase(name, p) for p in settings.include) or any(
                fnmatch.fnmatchcase(name, p) for p in settings.exclude):
            continue
        if not _is_kxk(conv):
            pointwise += 1
            continue
        reason = _why_not(name, conv, called, settings)
        if reason is None:
            width = min(round(settings.bottleneck * conv.in_channels), conv.in_channels, conv.out_channels)
            sizes = _chain(settings, width)
            if len(sizes) >= 2:
                spec[name] = {"group_sizes": sizes, "bottleneck": width}
                continue
            reason = f"fewer than two group sizes of the chain divide its bottleneck {width}"
        left[name] = reason
    if pointwise:
        left["1×1"] = f"{pointwise} 1×1 convolutions (nothing to decompose)"
    return spec, left


def _mapping(setting, model_name):
    """The spec mapping `setting` holds or names: the paper's specs, a YAML file's or the mapping itself."""
    if setting == "default":
        if model_name not in models.NAMES:
            raise ValueError(f"decompose.spec 'default' is the paper's spec of {list(models.NAMES)}; "
                             f"use auto (or a mapping) for {model_name!r}")
        return models.default_spec(model_name)
    if setting == "high_compression":
        return models.high_compression_spec()
    if isinstance(setting, str):
        if not os.path.isfile(setting):
            raise ValueError(f"decompose.spec must be one of {list(NAMED)}, a mapping layer → "
                             f"{{group_sizes, bottleneck}} or a YAML file of one, got {setting!r} (no such file)")
        with open(setting) as f:
            setting = yaml_load(f, f"decompose.spec {setting!r}")
    if not isinstance(setting, Mapping) or not setting:
        raise ValueError(f"decompose.spec must be a non-empty mapping layer → {{group_sizes, bottleneck}}, "
                         f"got {setting!r}")
    spec = {}
    for layer, entry in setting.items():
        if not isinstance(entry, Mapping):
            raise ValueError(f"decompose.spec[{layer!r}] must be a mapping {{group_sizes, bottleneck}}, got {entry!r}")
        spec[models.module_name(model_name, str(layer))] = dict(entry)
    return spec


def skeleton(model, spec):
    """A copy of `model` with the layers of `spec` as randomly initialised series; ValueError naming the broken rule."""
    modules = dict(model.named_modules())
    for name in spec:
        if name in modules and not _is_kxk(modules[name]):
            what = "a 1×1 convolution" if isinstance(modules[name], nn.Conv2d) else f"a {type(modules[name]).__name__}"
            raise ValueError(f"decompose.spec[{name!r}]: the layer is {what}, not a k×k convolution (k > 1)")
    try:
        return convert(model, spec, inplace=False, init="random", progress=False)
    except (ValueError, TypeError) as err:
        raise ValueError(f"decompose.spec: {err}") from err


def resolve(setting, model_name, model, input_size, auto_settings):
    """(spec, left alone) for a `decompose.spec` setting and the untrained `model`; checked (see `skeleton`)."""
    if setting == "auto":
        spec, left = auto_spec(model, input_size, auto_settings)
        if not spec:
            raise ValueError(f"decompose.spec: auto finds no convolution to decompose in {model_name!r} (each k×k "
                             f"one is grouped, too narrow or excluded; `gross spec` lists why)")
    else:
        spec, left = _mapping(setting, model_name), {}
    skeleton(model, spec)
    return spec, left


def _key(name):
    plain = name.replace(".", "").replace("_", "").isalnum() and not name[:1].isdigit()
    return name if plain else json.dumps(name)


def listing(model, spec, left, input_size, header=()):
    """The spec as YAML with each layer's shape and share of the model's MACs in comments (pass it back as a spec)."""
    total, rows = count_macs(model, input_size, per_layer=True)
    macs, out_hw = {}, {}
    for row in rows:
        macs[row["layer"]] = macs.get(row["layer"], 0) + row["macs"]
        out_hw.setdefault(row["layer"], "×".join(map(str, row["output"][1:])))
    modules = dict(model.named_modules())
    covered = sum(macs.get(name, 0) for name in spec)
    lines = [f"# {line}" for line in header]
    lines.append(f"# {len(spec)} layers decomposed; their convolutions hold {covered:,} of the model's "
                 f"{total:,} MACs ({100 * covered / total:.1f} %)")
    for name, entry in spec.items():
        conv = modules[name]
        lines += [f"{_key(name)}:  # {'×'.join(map(str, conv.kernel_size))}, {conv.in_channels}→{conv.out_channels}, "
                  f"out {out_hw.get(name, '?')}: {macs.get(name, 0):,} MACs ({100 * macs.get(name, 0) / total:.2f} %)",
                  f"  group_sizes: {json.dumps(list(entry['group_sizes']))}",
                  f"  bottleneck: {json.dumps(entry.get('bottleneck'))}"]
    if not spec:
        lines.append("{}  # nothing to decompose")
    if left:
        lines.append("# left alone:")
        lines += [f"#   {name}: {reason}" for name, reason in left.items()]
    return "\n".join(lines) + "\n"
