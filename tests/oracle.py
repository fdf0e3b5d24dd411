"""Naive oracle for the series ops: a plain sum of F.conv2d per active term."""
import torch
import torch.nn.functional as F


def naive_series_conv(x, cores, group_sizes, group_size, stride=1, padding=0, dilation=1):
    """Σ_{i: g_i <= group_size} conv2d(x, cores[i], groups=S // g_i)."""
    S = x.shape[1]
    out = None
    for core, g in zip(cores, group_sizes):
        if g > group_size:
            continue
        term = F.conv2d(x, core, None, stride, padding, dilation, S // g)
        out = term if out is None else out + term
    return out


def naive_bottleneck(x, firsts, cores, lasts, bias, group_sizes, group_size, stride=1, padding=0, dilation=1):
    """1×1 (Σ A_i) → series core → 1×1 (Σ C_i) + bias, active terms only."""
    active = [i for i, g in enumerate(group_sizes) if g <= group_size]
    A = sum(firsts[i] for i in active)
    C = sum(lasts[i] for i in active)
    u = F.conv2d(x, A)
    z = naive_series_conv(u, cores, group_sizes, group_size, stride, padding, dilation)
    return F.conv2d(z, C, bias)


def dense_grads(grads, leaves):
    """Gradients with None as zeros: an inactive term gets none in eager, zeros from a compiled
    graph (where the op receives every term)."""
    return [torch.zeros_like(t) if g is None else g for g, t in zip(grads, leaves)]
