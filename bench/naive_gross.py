"""The released GroSS approach, the benchmarks' baseline: expand each term by a Python loop over its
filter groups (zero-pad each into its G-group, concatenate), sum, then three plain convolutions."""
import torch
import torch.nn.functional as F
from torch import nn


def expand_by_loop(core, S, g, G):
    """A g-term re-expressed at group size G, one filter group at a time, as the released code does."""
    T, _, kh, kw = core.shape
    per_group, r = T * g // S, G // g
    blocks = []
    for j in range(S // g):
        position = j % r  # where this g-block sits inside its G-block
        before = core.new_zeros(per_group, position * g, kh, kw)
        after = core.new_zeros(per_group, (r - position - 1) * g, kh, kw)
        blocks.append(torch.cat([before, core[j * per_group:(j + 1) * per_group], after], dim=1))
    return torch.cat(blocks, dim=0)


def naive_layer(x, firsts, cores, lasts, bias, group_sizes, group_size, stride, padding,
                dilation=1):
    """The decomposed layer at `group_size`: summed expanded terms, then 1×1, grouped k×k, 1×1 + bias."""
    S = firsts[0].shape[0]
    active = [i for i, g in enumerate(group_sizes) if g <= group_size]
    A = sum(firsts[i] for i in active)
    B = sum(expand_by_loop(cores[i], S, group_sizes[i], group_size) for i in active)
    C = sum(lasts[i] for i in active)
    u = F.conv2d(x, A)
    z = F.conv2d(u, B, None, stride, padding, dilation, S // group_size)
    return F.conv2d(z, C, bias)


class ReleasedSeries(nn.Module):
    """A SeriesConv2d computed the released way (`naive_layer`: expansion by loops) on every call."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        layer = self.layer
        return naive_layer(x, list(layer.firsts), list(layer.cores), list(layer.lasts), layer.bias,
                           layer.group_sizes, layer.group_size, layer.stride, layer.padding,
                           layer.dilation)
