"""The benchmark cases, defined once: the paper's decomposed layer shapes, their random tensors and one timed call.

bench/ops.py and bench/kernels.py (the tables of bench/RESULTS.md), the pytest-benchmark suites
(bench/test_bench_*.py) and bench/gpu_check.py all draw their layers, inputs and callables from here.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

import gross_kernels as gk
from naive_gross import naive_layer
from torch_layer import torch_layer


@dataclass
class Layer:
    """One decomposed 3×3 convolution: the layer shape and its group-size series."""

    net: str
    names: list
    batch: int
    c_in: int
    c_out: int
    hw: int
    stride: int
    S: int
    T: int
    group_sizes: tuple
    padding: int = 1
    dilation: int = 1

    def key(self):
        """Everything that makes two layers time alike (the names aside)."""
        return (self.net, self.batch, self.c_in, self.c_out, self.hw, self.stride, self.S, self.T,
                self.group_sizes, self.padding, self.dilation)

    @property
    def title(self):
        """E.g. "VGG-16 conv3_2, conv3_3": the network's name and the layers of this shape."""
        return " ".join(filter(None, (NET_TITLES.get(self.net, self.net), ", ".join(self.names))))

    @property
    def shape(self):
        """E.g. "64×256×8² → 256, S→T 256→256": batch × channels × pixels, widths, geometry."""
        return (f"{self.batch}×{self.c_in}×{self.hw}² → {self.c_out}, S→T {self.S}→{self.T}"
                + (f", stride {self.stride}" if self.stride > 1 else "")
                + (f", dilation {self.dilation}" if self.dilation > 1 else ""))

    def extremes(self):
        """The smallest and the largest group size of the series (one if the series has one)."""
        return tuple(dict.fromkeys((self.group_sizes[0], self.group_sizes[-1])))


NET_TITLES = {"4layer": "4-layer", "vgg16-cifar": "VGG-16", "vgg16-imagenet": "VGG-16 ImageNet",
              "resnet18": "ResNet-18", "vgg16-hc": "VGG-16 high-compression"}
NETS = tuple(NET_TITLES)


def _powers_of_two(n):
    return tuple(2 ** i for i in range(int(math.log2(n)) + 1))


_VGG = [("conv1_2", 64, 64, 1), ("conv2_1", 64, 128, 2), ("conv2_2", 128, 128, 2),
        ("conv3_1", 128, 256, 4), ("conv3_2", 256, 256, 4), ("conv3_3", 256, 256, 4),
        ("conv4_1", 256, 512, 8), ("conv4_2", 512, 512, 8), ("conv4_3", 512, 512, 8),
        ("conv5_1", 512, 512, 16), ("conv5_2", 512, 512, 16), ("conv5_3", 512, 512, 16)]
_RESNET18 = [("layer1.*", 64, 64, 56, 1, 4), ("layer2.0.conv1", 64, 128, 56, 2, 1),
             ("layer2.*", 128, 128, 28, 1, 3), ("layer3.0.conv1", 128, 256, 28, 2, 1),
             ("layer3.*", 256, 256, 14, 1, 3), ("layer4.0.conv1", 256, 512, 14, 2, 1),
             ("layer4.*", 512, 512, 7, 1, 3)]


def _high_compression():
    """Human VGG layer name → (S, T, group sizes) of the high-compression VGG-16 (DESIGN.md §4)."""
    # Imported here: gross.models imports torchvision, seconds that most users of cases never need.
    from gross.models import HUMAN_NAMES, high_compression_spec

    spec = high_compression_spec()
    return {human: (*spec[module]["bottleneck"], tuple(spec[module]["group_sizes"]))
            for human, module in HUMAN_NAMES["vgg16_imagenet"].items() if module in spec}


def paper_layers(net):
    """The decomposed layers of `net` at the paper's batch size and resolution."""
    if net == "4layer":
        return [Layer(net, [n], 256, ci, co, hw, 1, ci, ci, _powers_of_two(ci))
                for n, ci, co, hw in [("conv2", 32, 32, 16), ("conv3", 32, 64, 8),
                                      ("conv4", 64, 64, 4)]]
    if net in ("vgg16-cifar", "vgg16-imagenet"):
        batch, base = (256, 32) if net == "vgg16-cifar" else (64, 224)
        return [Layer(net, [n], batch, ci, co, base // div, 1, ci, ci, (1, 4, 16, 32))
                for n, ci, co, div in _VGG]
    if net == "resnet18":
        return [Layer(net, [n] if count == 1 else [f"{n} ×{count}"], 64, ci, co, hw, s,
                      ci, ci, (1, 4, 16, 32)) for n, ci, co, hw, s, count in _RESNET18]
    if net == "vgg16-hc":
        widths = _high_compression()
        return [Layer(net, [n], 64, ci, co, 224 // div, 1, *widths[n]) for n, ci, co, div in _VGG]
    raise ValueError(f"net must be one of {NETS}, got {net!r}")


def tiny(layer):
    """A copy of `layer` small enough for Triton's CPU interpreter: 1 sample, 2×2 pixels, a quarter
    of the channels (at least 4) and group sizes 1 and S; an S ≠ T bottleneck keeps its widths and
    its smallest and largest group size (a quarter of them need not make a valid series)."""
    c_in, c_out = (max(4, c // 4) for c in (layer.c_in, layer.c_out))
    if layer.S == layer.T:
        S = T = max(4, layer.S // 4)
        sizes = (1, S)
    else:
        S, T, sizes = layer.S, layer.T, layer.extremes()
    return dataclasses.replace(layer, names=list(layer.names), batch=1, hw=2, c_in=c_in,
                               c_out=c_out, S=S, T=T, group_sizes=sizes)


def _merged(layers):
    merged = {}
    for layer in layers:
        if layer.key() in merged:
            merged[layer.key()].names += layer.names
        else:
            merged[layer.key()] = dataclasses.replace(layer, names=list(layer.names))
    return list(merged.values())


def distinct_layers(net):
    """The layers of `net` with identical shapes merged (their names joined)."""
    return _merged(paper_layers(net))


def unique_layers(nets, smoke=False):
    """Paper layers of several networks with identical shapes merged; `smoke`: the first, tiny."""
    if smoke:
        return [tiny(paper_layers(nets[0])[0])]
    return _merged(layer for net in nets for layer in paper_layers(net))


def interleaved_layers(nets):
    """Each network's distinct shapes, taken in turn (first of each network, then second, ...),
    so that a run cut short by a time budget still covers every network."""
    per_net = [distinct_layers(net) for net in nets]
    return [layers[i] for i in range(max(map(len, per_net))) for layers in per_net if i < len(layers)]


def ops_layers():
    """The CPU ops benchmark's layers: 4-layer conv2-conv4 at batch 128, VGG-16 (CIFAR) conv2_2,
    conv3_2, conv4_2, conv5_2 at batch 64."""
    picks = {"4layer": (128, ("conv2", "conv3", "conv4")),
             "vgg16-cifar": (64, ("conv2_2", "conv3_2", "conv4_2", "conv5_2"))}
    return [dataclasses.replace(layer, batch=batch) for net, (batch, names) in picks.items()
            for layer in paper_layers(net) if layer.names[0] in names]


def make_tensors(layer, device="cpu", dtype=torch.float32, sets=1):
    """Random inputs (a list of `sets`, to rotate) and term weights (A_i, B_i, C_i, bias) of `layer`."""
    n, hw = layer.batch, layer.hw
    xs = [torch.randn(n, layer.c_in, hw, hw, device=device, dtype=dtype) for _ in range(sets)]

    def param(*shape, fan_in):
        return (torch.randn(*shape, device=device) / math.sqrt(fan_in)).to(dtype)

    firsts = [param(layer.S, layer.c_in, 1, 1, fan_in=layer.c_in) for _ in layer.group_sizes]
    cores = [param(layer.T, g, 3, 3, fan_in=9 * g) for g in layer.group_sizes]
    lasts = [param(layer.c_out, layer.T, 1, 1, fan_in=layer.T) for _ in layer.group_sizes]
    bias = param(layer.c_out, fan_in=1)
    return xs, firsts, cores, lasts, bias


# The plain PyTorch layer and the released GroSS approach, timed beside the library's backends.
# A name with a trailing "'" runs its namesake again (the tables' noise-floor twin).
BASELINES = {"torch": torch_layer, "naive": naive_layer}
PASSES = ("fwd", "fwd+bwd", "fwd+bwd x frozen")


def call_layer(backend, layer, x, firsts, cores, lasts, bias, group_size):
    """The decomposed layer at `group_size` on input x, run by a baseline or a library backend."""
    name = backend.rstrip("'")
    if name in BASELINES:
        return BASELINES[name](x, firsts, cores, lasts, bias, layer.group_sizes, group_size,
                               layer.stride, layer.padding, layer.dilation)
    return gk.series_bottleneck_conv2d(x, firsts, cores, lasts, bias, layer.group_sizes,
                                       group_size, stride=layer.stride, padding=layer.padding,
                                       dilation=layer.dilation, backend=backend)


def runner(backend, layer, tensors, group_size, pass_):
    """fn(i=0) -> y: one pass (see PASSES) of the layer on input set i (mod the sets in `tensors`).

    "fwd" runs under no_grad; "fwd+bwd" computes the gradients of x and every weight,
    "fwd+bwd x frozen" those of the weights only (the first series layer after a frozen stem).
    Sets requires_grad on the tensors accordingly.
    """
    xs, firsts, cores, lasts, bias = tensors
    params = [*firsts, *cores, *lasts, bias]

    def layer_on(i):
        return call_layer(backend, layer, xs[i % len(xs)], firsts, cores, lasts, bias, group_size)

    if pass_ == "fwd":
        def forward(i=0):
            with torch.no_grad():
                return layer_on(i)
        return forward
    if pass_ not in PASSES:
        raise ValueError(f"pass_ must be one of {PASSES}, got {pass_!r}")
    for t in params:
        t.requires_grad_(True)
    for x in xs:
        x.requires_grad_(pass_ == "fwd+bwd")
    with torch.no_grad():
        grad_y = torch.randn_like(layer_on(0))

    def forward_backward(i=0):
        y = layer_on(i)
        wrt = params + ([xs[i % len(xs)]] if pass_ == "fwd+bwd" else [])
        torch.autograd.grad(y, wrt, grad_y, allow_unused=True)
        return y

    return forward_backward


def tolerance(dtype):
    """Relative error a backend may show against the reference layer in `dtype`
    (float32 convolutions may run in TF32 where PyTorch allows it)."""
    if dtype == torch.float32:
        return 1e-2 if torch.backends.cudnn.allow_tf32 else 1e-4
    return 3e-2


def rel_error(a, b):
    """‖a − b‖ / ‖b‖ in float64 (0 when both are zero)."""
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()
