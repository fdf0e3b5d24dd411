"""The paper's networks (4-layer CIFAR net, VGG-16 CIFAR/ImageNet, ResNet-18), their init and series specs."""
import os

import torch
import torch.nn as nn
import torchvision

NAMES = ("four_layer", "vgg16_cifar", "vgg16_imagenet", "resnet18")

# VGG-16 (configuration "D"): channels per conv, "M" for a 2×2 max pool.
_VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")
_DEFAULT_CLASSES = {"four_layer": 10, "vgg16_cifar": 10, "vgg16_imagenet": 1000, "resnet18": 1000}
_TORCHVISION_BUILDERS = {"vgg16_imagenet": torchvision.models.vgg16, "resnet18": torchvision.models.resnet18}
_TORCHVISION_WEIGHT_ENUMS = {"vgg16_imagenet": "VGG16_Weights", "resnet18": "ResNet18_Weights"}


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
    """Module name (as in named_modules) of `layer`, given as a human name (e.g. 'conv1_2') or a module name."""
    _check_name(name)
    return HUMAN_NAMES[name].get(layer, layer)


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
    from gross import checkpoint
    if checkpoint.is_gross_file(path):
        return checkpoint.load(path)["model"]
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ValueError(f"weights file {path!r} holds no state dict")
    return state


def build(name, num_classes=None, weights=None, fc_std=0.01):
    """Build network `name` (see NAMES); `weights`: a local file path or (ImageNet nets) a torchvision enum name.

    Without weights the appendix's initialisation is applied (see init_weights). Weights are
    never downloaded unless a torchvision enum name is given explicitly.
    """
    _check_name(name)
    default_classes = _DEFAULT_CLASSES[name]
    num_classes = default_classes if num_classes is None else num_classes
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    if weights is not None and not isinstance(weights, (str, os.PathLike)):
        raise TypeError(f"weights must be a file path or a torchvision weights name, got {type(weights).__name__}")
    is_file = weights is not None and os.path.isfile(weights)

    if name in _TORCHVISION_BUILDERS and weights is not None and not is_file:
        enum_name = str(weights)
        if "." not in enum_name:
            enum_name = f"{_TORCHVISION_WEIGHT_ENUMS[name]}.{enum_name}"
        try:
            enum = torchvision.models.get_weight(enum_name)
        except (ValueError, KeyError, AttributeError) as err:
            raise ValueError(f"weights {weights!r} is neither an existing file nor a torchvision weights name "
                             f"such as '{_TORCHVISION_WEIGHT_ENUMS[name]}.IMAGENET1K_V1'") from err
        if num_classes != default_classes:
            raise ValueError(f"num_classes must be {default_classes} with torchvision weights {weights!r}")
        return _TORCHVISION_BUILDERS[name](weights=enum)
    if weights is not None and not is_file:
        raise ValueError(f"weights for {name!r} must be an existing file, got {weights!r}")

    if name == "four_layer":
        model = FourLayerNet(num_classes)
    elif name == "vgg16_cifar":
        model = VGG16CIFAR(num_classes)
    else:
        model = _TORCHVISION_BUILDERS[name](weights=None, num_classes=num_classes)
    init_weights(model, fc_std)
    if is_file:
        model.load_state_dict(_state_dict_from_file(weights))
    return model


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
