"""Random valid cases for the series ops: nested series, S ≠ T, odd sizes, stride/padding/dilation."""
import random
from dataclasses import dataclass

import torch

# Nested series with the bottleneck widths (S, T) they are valid for: powers of two and not.
SERIES = [
    ((1,), 4, 4), ((1, 2), 4, 8), ((1, 2, 4), 8, 8), ((2, 4), 8, 12), ((1, 4), 4, 8),
    ((3, 9, 18), 18, 12), ((3, 6), 6, 10), ((5, 10), 10, 4), ((1, 3), 6, 12), ((4, 8), 8, 6),
    ((1, 2, 4, 8), 8, 16), ((2, 6), 12, 6),
]


@dataclass
class Case:
    """One random call of the series op."""

    group_sizes: tuple
    group_size: int
    S: int
    T: int
    batch: int
    hw: tuple
    kernel: tuple
    stride: tuple
    padding: tuple
    dilation: tuple

    def tensors(self, dtype=torch.float64, generator=None):
        """Random input and cores (never zeros)."""
        x = torch.randn(self.batch, self.S, *self.hw, dtype=dtype, generator=generator)
        cores = [torch.randn(self.T, g, *self.kernel, dtype=dtype, generator=generator)
                 for g in self.group_sizes]
        return x, cores

    def geometry(self):
        return self.stride, self.padding, self.dilation


def random_case(rng: random.Random, max_hw: int = 9) -> Case:
    """A random valid case; spatial size is large enough for the dilated kernel."""
    group_sizes, S, T = rng.choice(SERIES)
    k = rng.choice([1, 3, 5])
    kernel = (k, rng.choice([1, 3])) if rng.random() < 0.15 else (k, k)
    stride = (rng.randint(1, 2),) * 2 if rng.random() < 0.8 else (1, 2)
    padding = (rng.randint(0, 2),) * 2 if rng.random() < 0.8 else (0, 1)
    dilation = (rng.randint(1, 2),) * 2
    hw = []
    for kk, p, d in zip(kernel, padding, dilation):
        span = d * (kk - 1) + 1
        low = max(1, span - 2 * p)
        size = rng.randint(low, max(low, max_hw))
        hw.append(size | 1 if rng.random() < 0.7 else size)  # mostly odd sizes
    return Case(group_sizes, rng.choice(group_sizes), S, T, rng.randint(1, 4), tuple(hw), kernel,
                stride, padding, dilation)
