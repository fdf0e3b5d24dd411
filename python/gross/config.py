"""Configurations: one active group size per SeriesConv2d layer of a model (get, set, validate, sample)."""
from collections.abc import Mapping

from gross_kernels import SeriesConv2d


def series_layers(model):
    """The model's SeriesConv2d layers as a dict module name → layer, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, SeriesConv2d)}


def get_config(model):
    """The active configuration: module name → group size for every SeriesConv2d layer."""
    return {name: layer.group_size for name, layer in series_layers(model).items()}


def config_space(model):
    """Per SeriesConv2d layer, the list of group sizes it can run at."""
    return {name: list(layer.group_sizes) for name, layer in series_layers(model).items()}


def levels(space):
    """Configurations of `space` ({layer: group sizes}) that together visit every group size of
    every layer once: index j of each layer's sizes (clamped to its largest) for j = 0, 1, …"""
    depth = max((len(sizes) for sizes in space.values()), default=0)
    return [{name: sizes[min(j, len(sizes) - 1)] for name, sizes in space.items()}
            for j in range(depth)]


def validate_config(model, config, complete=False):
    """Check `config` against the model (names and group sizes); with complete=True every layer must be named."""
    if not isinstance(config, Mapping):
        raise TypeError(f"config must be a mapping layer name → group size, got {type(config).__name__}")
    layers = series_layers(model)
    unknown = [name for name in config if name not in layers]
    if unknown:
        raise ValueError(f"config names unknown layers {unknown}; the model's SeriesConv2d layers are {list(layers)}")
    for name, size in config.items():
        if isinstance(size, bool) or not isinstance(size, int):
            raise TypeError(f"config[{name!r}] must be an int group size, got {size!r}")
        if size not in layers[name].group_sizes:
            raise ValueError(f"config[{name!r}] = {size} is not a group size of that layer; "
                             f"valid sizes are {list(layers[name].group_sizes)}")
    missing = [name for name in layers if name not in config]
    if complete and missing:
        raise ValueError(f"config must name every SeriesConv2d layer; missing {missing}")


def set_config(model, config, complete=False):
    """Activate `config` (layer name → group size); validates everything before changing any layer.

    Layers not named keep their current size unless complete=True, which requires every layer.
    """
    validate_config(model, config, complete)
    layers = series_layers(model)
    for name, size in config.items():
        layers[name].group_size = size
    return model


def uniform_config(model, group_size):
    """Every SeriesConv2d layer at `group_size` (ValueError naming the layers that lack it)."""
    space = config_space(model)
    lacking = [name for name, sizes in space.items() if group_size not in sizes]
    if lacking:
        raise ValueError(f"group_size {group_size} is not available in layers {lacking}")
    return {name: group_size for name in space}


def extreme_config(model, largest=True):
    """Every layer at its largest (largest=True) or smallest group size."""
    pick = max if largest else min
    return {name: pick(sizes) for name, sizes in config_space(model).items()}


def sample_config(model, generator=None):
    """Draw and activate a uniformly random group size per SeriesConv2d layer; returns the config."""
    return {name: layer.sample_group_size(generator) for name, layer in series_layers(model).items()}


def config_string(config):
    """Compact form of a configuration: group sizes in layer order, e.g. '4-8-16'."""
    return "-".join(str(g) for g in config.values())
