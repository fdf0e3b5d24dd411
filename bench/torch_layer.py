"""The plainest layer a PyTorch user would write: the summed weight by one scatter, three F.conv2d, autograd."""
import functools

import torch
import torch.nn.functional as F


@functools.lru_cache(maxsize=None)
def _scatter_index(S, T, group_sizes, group_size, kh, kw):
    """Flat positions of every active term's entries in the (T, G, kh, kw) summed weight."""
    G, parts = group_size, []
    o = torch.arange(T).view(T, 1, 1, 1)
    a, b = torch.arange(kh).view(1, 1, kh, 1), torch.arange(kw).view(1, 1, 1, kw)
    for g in (g for g in group_sizes if g <= G):
        c = torch.arange(g).view(1, g, 1, 1)
        column = (o // (T * g // S)) % (G // g) * g + c  # a g-block's place inside its G-block
        parts.append((((o * G + column) * kh + a) * kw + b).flatten())
    return torch.cat(parts)


def torch_layer(x, firsts, cores, lasts, bias, group_sizes, group_size, stride, padding, dilation=1):
    """The decomposed layer at `group_size` in plain PyTorch (what the `torch` benchmark column runs)."""
    n = sum(1 for g in group_sizes if g <= group_size)
    S, (T, _, kh, kw) = firsts[0].shape[0], cores[0].shape
    index = _scatter_index(S, T, tuple(group_sizes), group_size, kh, kw).to(x.device)
    flat = torch.cat([c.flatten() for c in cores[:n]])
    weight = flat.new_zeros(T * group_size * kh * kw).index_add(0, index, flat)
    u = F.conv2d(x, sum(firsts[:n]))
    z = F.conv2d(u, weight.view(T, group_size, kh, kw), None, stride, padding, dilation, S // group_size)
    return F.conv2d(z, sum(lasts[:n]), bias)
