"""`SeriesGeom`: the normalised series and convolution geometry every backend receives, as one frozen value."""
from __future__ import annotations

from dataclasses import dataclass


def output_hw(input_hw, kernel_hw, stride, padding, dilation) -> tuple:
    """Spatial output size of a convolution (each argument a pair)."""
    return tuple((size + 2 * p - d * (k - 1) - 1) // s + 1
                 for size, k, s, p, d in zip(input_hw, kernel_hw, stride, padding, dilation))


@dataclass(frozen=True)
class SeriesGeom:
    """Group sizes of the series, the active one, and the k×k core's stride, padding, dilation (2-tuples).

    Built by `gross_kernels._validate` from checked arguments; hashable, so it keys dispatch
    decisions. The C++ kernels' `ConvGeom` is its counterpart.
    """

    group_sizes: tuple
    group_size: int
    stride: tuple = (1, 1)
    padding: tuple = (0, 0)
    dilation: tuple = (1, 1)

    @property
    def num_active(self) -> int:
        """How many terms are summed at the active size (always a prefix of the series)."""
        return sum(1 for g in self.group_sizes if g <= self.group_size)

    @property
    def conv(self) -> tuple:
        """(stride, padding, dilation), in F.conv2d's argument order."""
        return self.stride, self.padding, self.dilation

    def groups(self, S: int) -> int:
        """Groups of the summed core at the active size for S input channels."""
        return S // self.group_size

    def output_hw(self, input_hw, kernel_hw) -> tuple:
        """Spatial output size of the core for an input of spatial size `input_hw`."""
        return output_hw(input_hw, kernel_hw, self.stride, self.padding, self.dilation)

    def as_lists(self) -> tuple:
        """(group_sizes, group_size, stride, padding, dilation) as a custom op's schema takes them."""
        return (list(self.group_sizes), self.group_size, list(self.stride), list(self.padding),
                list(self.dilation))
