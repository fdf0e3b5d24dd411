"""`SeriesConv2d`: a drop-in Conv2d replacement holding every group size of a GroSS series at once."""
from __future__ import annotations

import math

import torch
from torch import nn

from . import _validate, backends
from .algebra import effective_core, sum_active
from .geometry import SeriesGeom, output_hw
from .ops import series_bottleneck_conv2d


def _kernel_pair(kernel_size) -> tuple:
    return _validate.pair("kernel_size", kernel_size, 1)


class SeriesConv2d(nn.Module):
    """Conv2d(C_in → C_out, k) as 1×1 (C_in→S) → grouped k×k series (S→T) → 1×1 (T→C_out) + bias.

    Term i owns firsts[i] (S, C_in, 1, 1), cores[i] (T, g_i, kh, kw) and lasts[i] (C_out, T, 1, 1);
    at group size g_j the layer sums the terms i ≤ j (DESIGN.md §1); the others get no gradient
    (use `torch.autograd.grad(..., allow_unused=True)` over all parameters).
    """

    def __init__(self, in_channels, out_channels, kernel_size, group_sizes, bottleneck=None,
                 stride=1, padding=0, dilation=1, bias=True, backend="auto"):
        super().__init__()
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        S, T = self._bottleneck_pair(bottleneck, in_channels)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = _kernel_pair(kernel_size)
        self.stride = _validate.pair("stride", stride, 1)
        self.padding = _validate.pair("padding", padding, 0)
        self.dilation = _validate.pair("dilation", dilation, 1)
        self.group_sizes = _validate.check_series(group_sizes, S, T)
        self.bottleneck = (S, T)
        self.backend = backends.check_name(backend)
        kh, kw = self.kernel_size
        self.firsts = nn.ParameterList(
            nn.Parameter(torch.empty(S, in_channels, 1, 1)) for _ in self.group_sizes)
        self.cores = nn.ParameterList(
            nn.Parameter(torch.empty(T, g, kh, kw)) for g in self.group_sizes)
        self.lasts = nn.ParameterList(
            nn.Parameter(torch.empty(out_channels, T, 1, 1)) for _ in self.group_sizes)
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        self._group_size = self.group_sizes[-1]
        self.reset_parameters()

    @staticmethod
    def _bottleneck_pair(bottleneck, in_channels) -> tuple:
        if bottleneck is None:
            return in_channels, in_channels
        if isinstance(bottleneck, int) and not isinstance(bottleneck, bool):
            bottleneck = (bottleneck, bottleneck)
        if (not isinstance(bottleneck, (tuple, list)) or len(bottleneck) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) for v in bottleneck)):
            raise TypeError(f"bottleneck must be None, an int S or a pair (S, T), got {bottleneck!r}")
        if min(bottleneck) <= 0:
            raise ValueError(f"bottleneck widths must be positive, got {tuple(bottleneck)}")
        return tuple(bottleneck)

    def reset_parameters(self) -> None:
        """Term 0 like nn.Conv2d's default init; later terms zero, so every size starts equal."""
        for params in (self.firsts, self.cores, self.lasts):
            nn.init.kaiming_uniform_(params[0], a=math.sqrt(5))
            for p in params[1:]:
                nn.init.zeros_(p)
        if self.bias is not None:
            fan_in = self.in_channels * self.kernel_size[0] * self.kernel_size[1]
            bound = 1.0 / math.sqrt(fan_in)
            nn.init.uniform_(self.bias, -bound, bound)

    @property
    def group_size(self) -> int:
        """The active group size (one of `group_sizes`)."""
        return self._group_size

    @group_size.setter
    def group_size(self, value: int) -> None:
        self._group_size = _validate.check_group_size(value, self.group_sizes)

    def sample_group_size(self, generator: torch.Generator | None = None) -> int:
        """Activate a group size drawn uniformly from the series; returns it."""
        index = int(torch.randint(len(self.group_sizes), (1,), generator=generator))
        self.group_size = self.group_sizes[index]
        return self.group_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return series_bottleneck_conv2d(x, list(self.firsts), list(self.cores), list(self.lasts),
                                        self.bias, self.group_sizes, self._group_size,
                                        self.stride, self.padding, self.dilation, self.backend)

    @torch.no_grad()
    def export(self) -> nn.Sequential:
        """Three plain nn.Conv2d computing this layer at the active group size."""
        S, T = self.bottleneck
        G = self._group_size
        n = SeriesGeom(self.group_sizes, G).num_active
        first = nn.Conv2d(self.in_channels, S, 1, bias=False)
        core = nn.Conv2d(S, T, self.kernel_size, self.stride, self.padding, self.dilation,
                         groups=S // G, bias=False)
        last = nn.Conv2d(T, self.out_channels, 1, bias=self.bias is not None)
        first.weight.copy_(sum_active(list(self.firsts), n))
        core.weight.copy_(effective_core(list(self.cores), self.group_sizes, G, S))
        last.weight.copy_(sum_active(list(self.lasts), n))
        if self.bias is not None:
            last.bias.copy_(self.bias)
        device, dtype = self.cores[0].device, self.cores[0].dtype
        return nn.Sequential(first, core, last).to(device=device, dtype=dtype)

    def output_size(self, input_hw) -> tuple:
        """Spatial output size for an input of spatial size `input_hw`."""
        return output_hw(input_hw, self.kernel_size, self.stride, self.padding, self.dilation)

    def macs(self, input_hw) -> int:
        """Multiply-accumulates of one sample at the active group size (three convolutions)."""
        S, T = self.bottleneck
        H, W = input_hw
        Ho, Wo = self.output_size(input_hw)
        kh, kw = self.kernel_size
        return (self.in_channels * S * H * W + T * self._group_size * kh * kw * Ho * Wo
                + self.out_channels * T * Ho * Wo)

    def get_extra_state(self):
        return {"group_sizes": list(self.group_sizes), "group_size": self._group_size}

    def set_extra_state(self, state) -> None:
        if list(state.get("group_sizes", [])) != list(self.group_sizes):
            raise ValueError(f"state_dict group_sizes {state.get('group_sizes')} do not match "
                             f"this layer's group_sizes {list(self.group_sizes)}")
        self.group_size = state["group_size"]

    def extra_repr(self) -> str:
        S, T = self.bottleneck
        text = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"group_sizes={self.group_sizes}, bottleneck=({S}, {T}), "
                f"group_size={self._group_size}, stride={self.stride}")
        if self.padding != (0, 0):
            text += f", padding={self.padding}"
        if self.dilation != (1, 1):
            text += f", dilation={self.dilation}"
        if self.bias is None:
            text += ", bias=False"
        if self.backend != "auto":
            text += f", backend={self.backend!r}"
        return text
