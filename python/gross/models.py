"""Networks from any source (the paper's, torchvision, timm, the user's factories), their weights and model files.

The paper's networks (4-layer CIFAR net, VGG-16 CIFAR/ImageNet, ResNet-18) are defined here with
their initialisation, human layer names and series specs.
"""
import inspect
import logging
import os

import torch
import torch.nn as nn
import torchvision

from gross import checkpoint
from gross.config import set_config
from gross.decompose import convert

NAMES = ("four_layer", "vgg16_cifar", "vgg16_imagenet", "resnet18")

# VGG-16 (configuration "D"): channels per conv, "M" for a 2×2 max pool.
_VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")
_DEFAULT_CLASSES = {"four_layer": 10, "vgg16_cifar": 10, "vgg16_imagenet": 1000, "resnet18": 1000}
_TORCHVISION_BUILDERS = {"vgg16_imagenet": torchvision.models.vgg16, "resnet18": torchvision.models.resnet18}


class FourLayerNet(nn.Module):
    """Four 3×3 conv + ReLU + 2×2 max-pool stages, then fc 256→256→classes (32×32 RGB input)."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 32, 3, padding=1)
        self.conv3 = nn.Conv2d(32, 64, 3, padding=1)
        self.conv4 = nn.Conv2d(64, 64, 3, padding=1)
        self.fc1 = nn.Linear(256, 256)
        self.fc2 = nn.Linear(256, num_classes)
        self.pool = nn.MaxPool2d(2)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        for conv in (self.conv1, self.conv2, self.conv3, self.conv4):
            x = self.pool(self.relu(conv(x)))
        return self.fc2(self.relu(self.fc1(torch.flatten(x, 1))))


def _vgg_features():
    """VGG-16 conv trunk with torchvision's module indices, so layer names match the ImageNet model."""
    layers, c_in = [], 3
    for item in _VGG16_CFG:
        if item == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(c_in, item, 3, padding=1), nn.ReLU(inplace=True)]
            c_in = item
    return nn.Sequential(*layers)


class VGG16CIFAR(nn.Module):
    """VGG-16 without batch norm for 32×32 inputs: conv trunk, then dropout + fc 512→512→classes."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.features = _vgg_features()
        self.classifier = nn.Sequential(
            nn.Dropout(), nn.Linear(512, 512), nn.ReLU(inplace=True), nn.Dropout(), nn.Linear(512, num_classes))

    def forward(self, x):
        return self.classifier(torch.flatten(self.features(x), 1))


def _vgg_human_names():
    names, block, index, position = {}, 1, 1, 0
    for item in _VGG16_CFG:
        if item == "M":
            block, index = block + 1, 1
            position += 1
        else:
            names[f"conv{block}_{index}"] = f"features.{position}"
            index += 1
            position += 2  # conv + ReLU
    return names


_RESNET18_BLOCK_CONVS = tuple(f"layer{s}.{b}.conv{c}" for s in range(1, 5) for b in range(2) for c in (1, 2))

# Human layer names (as in the paper) → module names (as in model.named_modules()).
HUMAN_NAMES = {
    "four_layer": {f"conv{i}": f"conv{i}" for i in range(1, 5)} | {"fc1": "fc1", "fc2": "fc2"},
    "vgg16_cifar": _vgg_human_names(),
    "vgg16_imagenet": _vgg_human_names(),
    "resnet18": {name: name for name in _RESNET18_BLOCK_CONVS},
}


def _check_name(name):
    if name not in NAMES:
        raise ValueError(f"name must be one of {list(NAMES)}, got {name!r}")


def module_name(name, layer):
    """Module name (as in named_modules) of `layer`, given as a human name (e.g. 'conv1_2') or a module name.

    Human names exist for the paper's networks; other models' layers pass through unchanged.
    """
    parse_source(name)
    return HUMAN_NAMES.get(name, {}).get(layer, layer)


def init_weights(model, fc_std=0.01):
    """Appendix init: conv He-normal (fan_out, ReLU), linear N(0, fc_std²), biases 0, norm layers 1/0."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, fc_std)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
        else:
            continue
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    return model


def _state_dict_from_file(path):
    """A state dict from a gross weights file, a plain state dict, or a dict holding one."""
    if checkpoint.is_gross_file(path):
        return checkpoint.load(path)["model"]
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ValueError(f"weights file {path!r} holds no state dict")
    return state


SOURCE_RULE = (f"one of the paper's networks {list(NAMES)}, 'torchvision:NAME', 'timm:NAME' or "
               f"'python:package.module:factory'")


def parse_source(text, key="name"):
    """(kind, name) of a model string: ('paper', NAME), ('torchvision', NAME), ('timm', NAME) or ('python', 'mod:fn')."""
    if isinstance(text, str):
        if text in NAMES:
            return "paper", text
        kind, sep, rest = text.partition(":")
        if sep and rest and kind in ("torchvision", "timm"):
            return kind, rest
        if sep and kind == "python":
            module, sep, factory = rest.rpartition(":")
            if sep and module and factory:
                return kind, rest
    raise ValueError(f"{key} must be {SOURCE_RULE}, got {text!r}")


def _torchvision_builder(kind, ident, text):
    """The torchvision builder behind a source (the paper's resnet18 / vgg16_imagenet too), or None."""
    if kind == "paper":
        return _TORCHVISION_BUILDERS.get(ident)
    if kind != "torchvision":
        return None
    if ident not in torchvision.models.list_models(module=torchvision.models):
        raise ValueError(f"model {text!r}: {ident!r} is not a torchvision classification model "
                         f"(torchvision.models.list_models(module=torchvision.models) lists them)")
    return torchvision.models.get_model_builder(ident)


def check_weights(name, weights):
    """Check a `weights` setting for model `name` without loading or downloading: the torchvision enum it names, or None (a file, or no weights)."""
    if weights is None:
        return None
    if not isinstance(weights, (str, os.PathLike)):
        raise TypeError(f"weights must be a file path or a torchvision weights name, got {type(weights).__name__}")
    if os.path.isfile(weights):
        return None
    kind, ident = parse_source(name)
    builder = _torchvision_builder(kind, ident, name)
    if builder is None:
        raise ValueError(f"weights for {name!r} must be an existing file, got {weights!r}")
    return _torchvision_weights(builder, weights, name)


def _torchvision_weights(name, weights, text):
    """The torchvision weights enum that `weights` names for model `name` (e.g. 'IMAGENET1K_V1' or 'ResNet18_Weights.DEFAULT')."""
    enum_type = torchvision.models.get_model_weights(name)
    prefix, _, short = str(weights).rpartition(".")
    if (prefix and prefix != enum_type.__name__) or short not in enum_type.__members__:
        raise ValueError(f"weights {weights!r} for model {text!r} is neither an existing file nor a torchvision "
                         f"weights name such as '{enum_type.__name__}.{next(iter(enum_type.__members__))}'")
    return enum_type[short]


def _timm():
    try:
        import timm
    except ImportError as err:
        raise ValueError("model 'timm:NAME' needs the optional package timm (pip install timm), "
                         "which is not installed") from err
    return timm


def _python_factory(spec, text):
    import importlib

    module_name, _, attr = spec.rpartition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"model {text!r}: module {module_name!r} cannot be imported ({err}); "
                         f"put its folder on PYTHONPATH") from err
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ValueError(f"model {text!r}: module {module_name!r} has no callable {attr!r}")
    return factory


def _accepts(fn, keyword):
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return True
    return any(p.name == keyword or p.kind is p.VAR_KEYWORD for p in params)


def build(name, num_classes=None, weights=None, fc_std=0.01, kwargs=None):
    """Build a network from its source string (see `parse_source`); `kwargs` go to its builder.

    The paper's networks get the appendix's initialisation (see init_weights); the others their
    own. `weights`: a local file (a gross weights file or a state dict), or for torchvision
    models (the paper's resnet18 and vgg16_imagenet included) a weights enum name, which is the
    only case that downloads. `num_classes` (default: the builder's) is passed to the builder;
    a user factory that takes no `num_classes` keyword is called without it.
    """
    kind, ident = parse_source(name)
    kwargs = dict(kwargs or {})
    if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int)
                                    or num_classes < 1):
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    enum = check_weights(name, weights)
    is_file = weights is not None and enum is None
    classes = {} if num_classes is None else {"num_classes": num_classes}
    builder = _torchvision_builder(kind, ident, name)
    if enum is not None:
        default_classes = len(enum.meta["categories"])
        if num_classes not in (None, default_classes):
            raise ValueError(f"num_classes must be {default_classes} with torchvision weights {weights!r}, "
                             f"got {num_classes}")
        return builder(weights=enum, **kwargs)

    if kind == "paper":
        if kwargs:
            raise ValueError(f"model_kwargs must be empty for the paper's network {name!r}, got {kwargs}")
        num_classes = _DEFAULT_CLASSES[ident] if num_classes is None else num_classes
        if ident == "four_layer":
            model = FourLayerNet(num_classes)
        elif ident == "vgg16_cifar":
            model = VGG16CIFAR(num_classes)
        else:
            model = builder(weights=None, num_classes=num_classes)
        init_weights(model, fc_std)
    elif kind == "torchvision":
        model = builder(weights=None, **classes, **kwargs)
    elif kind == "timm":
        timm = _timm()
        if not timm.is_model(ident):
            raise ValueError(f"model {name!r}: timm has no model {ident!r} (timm.list_models() lists them)")
        model = timm.create_model(ident, pretrained=False, **classes, **kwargs)
    else:
        factory = _python_factory(ident, name)
        if not _accepts(factory, "num_classes"):
            classes = {}
        try:
            model = factory(**classes, **kwargs)
        except TypeError as err:
            raise ValueError(f"model {name!r}: the factory refused model_kwargs {kwargs}: {err}") from err
        if not isinstance(model, nn.Module):
            raise ValueError(f"model {name!r}: the factory returned a {type(model).__name__}, not an nn.Module")
    if is_file:
        model.load_state_dict(_state_dict_from_file(weights))
    return model


def check_input(model, name, input_size, num_classes):
    """Run `model` on one fake input of `input_size`; ValueError when it cannot or its output is not num_classes wide."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    was_training = model.training
    model.eval()
    # The fake-tensor mode logs a failing shape check with its traceback; the error raised below says it in a line.
    quiet = logging.getLogger("torch._subclasses.fake_tensor")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)
    try:
        with torch.no_grad(), FakeTensorMode(allow_non_fake_inputs=True):
            out = model(torch.empty(1, *input_size))
    except (RuntimeError, ValueError, IndexError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"data.input_size {list(input_size)}: model {name!r} cannot run on it "
                         f"(too small for the network? {first})") from err
    finally:
        quiet.setLevel(level)
        model.train(was_training)
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[1] != num_classes:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"model {name!r}: its output must be (batch, {num_classes}) for the data's "
                         f"{num_classes} classes, got {shape} (give the factory a num_classes keyword)")


def load(path):
    """The model of a model file (`checkpoint.save_model`), rebuilt from its record with its weights; (model, record)."""
    record = checkpoint.read_record(path)
    model = build(record.model, num_classes=record.num_classes, kwargs=record.kwargs)
    if record.spec:
        model = convert(model, record.spec, init="random", progress=False)
    checkpoint.load_weights(path, model)
    if record.config:
        set_config(model, record.config)
    return model, record


def _spec_entry(group_sizes, bottleneck=None):
    return {"group_sizes": list(group_sizes), "bottleneck": bottleneck}


def default_spec(name):
    """The paper's decomposition spec: module name → {"group_sizes": [...], "bottleneck": S | [S, T] | None}."""
    _check_name(name)
    if name == "four_layer":
        # Bottleneck = C_in, group sizes: every power of two up to it.
        return {layer: _spec_entry([2 ** k for k in range(c_in.bit_length())], c_in)
                for layer, c_in in (("conv2", 32), ("conv3", 32), ("conv4", 64))}
    if name == "resnet18":
        layers = _RESNET18_BLOCK_CONVS
    else:
        layers = [module for human, module in HUMAN_NAMES[name].items() if human != "conv1_1"]
    return {layer: _spec_entry([1, 4, 16, 32]) for layer in layers}


# DESIGN.md §4 high-compression VGG-16 (ImageNet): human name → ((S, T), group sizes, original choice).
_HIGH_COMPRESSION = {
    "conv1_2": ((11, 18), (11,), 11),
    "conv2_1": ((10, 24), (5, 10), 10),
    "conv2_2": ((28, 28), (1, 7, 14, 28), 14),
    "conv3_1": ((36, 48), (3, 9, 18), 9),
    "conv3_2": ((60, 48), (15, 30, 60), 15),
    "conv3_3": ((64, 56), (16, 32, 64), 16),
    "conv4_1": ((64, 100), (16, 32, 64), 16),
    "conv4_2": ((116, 100), (29, 58, 116), 29),
    "conv4_3": ((132, 132), (3, 33, 66), 33),
    "conv5_1": ((224, 224), (7, 28, 56, 112), 56),
    "conv5_2": ((224, 224), (7, 28, 56, 112), 56),
    "conv5_3": ((224, 224), (7, 28, 56, 112), 56),
}


def high_compression_spec():
    """Spec of the high-compression VGG-16 (ImageNet): S≠T bottlenecks and the table's group sizes."""
    names = HUMAN_NAMES["vgg16_imagenet"]
    return {names[h]: _spec_entry(sizes, list(st)) for h, (st, sizes, _) in _HIGH_COMPRESSION.items()}


def high_compression_config():
    """The paper's original ('*') group-size choice per layer of the high-compression VGG-16, as a config."""
    names = HUMAN_NAMES["vgg16_imagenet"]
    return {names[h]: chosen for h, (_, _, chosen) in _HIGH_COMPRESSION.items()}
