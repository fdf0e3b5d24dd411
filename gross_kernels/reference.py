"""Pure-PyTorch reference kernels: vectorised block-diagonal expansion of the series, then F.conv2d.

This is the oracle every other backend is tested against, and the "PyTorch" baseline of the
benchmarks (cuDNN / oneDNN do the convolutions). Functions follow the kernel-level contract in
docs/ARCHITECTURE.md: arguments arrive validated and normalised.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _diagonal_blocks(weight: torch.Tensor, S: int, g: int, G: int) -> torch.Tensor:
    """View of the diagonal g-blocks of a group-size-G weight (T, G, kh, kw): (S/G, T·g/S, g, kh, kw, G/g).

    Output channel o of the g-grouping lies in G-group q, sub-block s (its g-group is q·G/g + s),
    at position j within that g-group; its g inputs sit at offset s·g of the G-group's inputs.
    """
    T, _, kh, kw = weight.shape
    r = G // g
    blocks = weight.view(S // G, r, T * g // S, r, g, kh, kw)
    return torch.diagonal(blocks, dim1=1, dim2=3)


def _as_diagonal(core: torch.Tensor, S: int, g: int, G: int) -> torch.Tensor:
    """A g-core (T, g, kh, kw) arranged like `_diagonal_blocks` of its expansion to group size G."""
    T, _, kh, kw = core.shape
    r = G // g
    return core.reshape(S // G, r, T * g // S, g, kh, kw).permute(0, 2, 3, 4, 5, 1)


def expand_core(core: torch.Tensor, S: int, g: int, G: int) -> torch.Tensor:
    """Re-express a core at group size g as a core at group size G (g | G): blocks on the diagonal."""
    if g == G:
        return core
    T, _, kh, kw = core.shape
    expanded = core.new_zeros(T, G, kh, kw)
    _diagonal_blocks(expanded, S, g, G).copy_(_as_diagonal(core, S, g, G))
    return expanded


def gather_core(weight_grad: torch.Tensor, S: int, g: int, G: int) -> torch.Tensor:
    """Adjoint of `expand_core`: the diagonal g-blocks of a group-size-G weight, as a g-core."""
    if g == G:
        return weight_grad
    T, _, kh, kw = weight_grad.shape
    diag = _diagonal_blocks(weight_grad.contiguous(), S, g, G)  # (S/G, T·g/S, g, kh, kw, r)
    return diag.permute(0, 5, 1, 2, 3, 4).reshape(T, g, kh, kw)


def effective_core(cores, group_sizes, group_size: int, S: int) -> torch.Tensor:
    """Σ over active terms of each core expanded to the active group size: one grouped weight."""
    active = [(core, g) for core, g in zip(cores, group_sizes) if g <= group_size]
    total = active[-1][0]  # the term at the active group size itself
    if len(active) == 1:
        return total
    # Each smaller term only touches its diagonal blocks: add it there in place, no expansion.
    total = total.clone(memory_format=torch.contiguous_format)
    for core, g in active[:-1]:
        _diagonal_blocks(total, S, g, group_size).add_(_as_diagonal(core, S, g, group_size))
    return total


def series_forward(x, cores, group_sizes, group_size, stride, padding, dilation):
    """Summed series of grouped convolutions as one grouped conv with the effective weight."""
    S = x.shape[1]
    weight = effective_core(cores, group_sizes, group_size, S)
    return F.conv2d(x, weight, None, stride, padding, dilation, S // group_size)


def series_backward_input(grad_z, cores, group_sizes, group_size, x_shape, stride, padding,
                          dilation):
    """Gradient of the series conv with respect to its input."""
    S = x_shape[1]
    weight = effective_core(cores, group_sizes, group_size, S)
    return torch.nn.grad.conv2d_input(tuple(x_shape), weight, grad_z, stride, padding, dilation,
                                      S // group_size)


def series_backward_weight(grad_z, x, cores, group_sizes, group_size, stride, padding, dilation):
    """Gradients of the active cores: the effective weight's gradient gathered per term."""
    S = x.shape[1]
    T, _, kh, kw = cores[0].shape
    weight_grad = torch.nn.grad.conv2d_weight(x, (T, group_size, kh, kw), grad_z, stride, padding,
                                              dilation, S // group_size)
    return [gather_core(weight_grad, S, g, group_size) for g in group_sizes if g <= group_size]


def conv_backward(grad_out, x, weight, stride, padding, dilation, groups):
    """(grad_x, grad_weight) of a bias-free convolution, both from one convolution backward."""
    grad_x, grad_weight, _ = torch.ops.aten.convolution_backward(
        grad_out, x, weight, None, list(stride), list(padding), list(dilation), False, [0, 0],
        groups, [True, True, False])
    return grad_x, grad_weight


def series_backward(grad_z, x, cores, group_sizes, group_size, stride, padding, dilation):
    """(grad_x, grads of the active cores) from one convolution backward on the summed weight."""
    S = x.shape[1]
    weight = effective_core(cores, group_sizes, group_size, S)
    grad_x, weight_grad = conv_backward(grad_z, x, weight, stride, padding, dilation,
                                        S // group_size)
    return grad_x, [gather_core(weight_grad, S, g, group_size)
                    for g in group_sizes if g <= group_size]


def pointwise(x, weight, bias=None):
    """A 1×1 convolution."""
    return F.conv2d(x, weight, bias)


def composite_bottleneck_activations(series_forward_fn, x, A, cores, C, bias, group_sizes,
                                     group_size, stride, padding, dilation):
    """1×1 A → series core (by the given backend function) → 1×1 C + bias; returns (y, u, z)."""
    u = pointwise(x, A)
    z = series_forward_fn(u, cores, group_sizes, group_size, stride, padding, dilation)
    return pointwise(z, C, bias), u, z


def composite_bottleneck_backward(series_fns, grad_y, x, A, cores, C, bias, group_sizes,
                                  group_size, stride, padding, dilation, activations=None):
    """Backward of the composite bottleneck; `series_fns` = (forward, backward) of the core, where
    backward(grad_z, u, cores, ...) returns (grad_u, grads of the active cores).

    `activations` = (u, z) saved by the forward; without them they are recomputed.
    """
    forward, backward = series_fns
    if activations is None:
        u = pointwise(x, A)
        z = forward(u, cores, group_sizes, group_size, stride, padding, dilation)
    else:
        u, z = activations
    unit = ((1, 1), (0, 0), (1, 1), 1)
    grad_bias = grad_y.sum(dim=(0, 2, 3)) if bias is not None else None
    grad_z, grad_C = conv_backward(grad_y, z, C, *unit)
    grad_u, grad_cores = backward(grad_z, u, cores, group_sizes, group_size, stride, padding,
                                  dilation)
    grad_x, grad_A = conv_backward(grad_u, x, A, *unit)
    return grad_x, grad_A, grad_cores, grad_C, grad_bias


SERIES_FNS = (series_forward, series_backward)


def bottleneck_forward_saving(x, A, cores, C, bias, group_sizes, group_size, stride, padding,
                              dilation):
    """The whole decomposed layer with reference series kernels: (y, u, z) for the backward."""
    return composite_bottleneck_activations(series_forward, x, A, cores, C, bias, group_sizes,
                                            group_size, stride, padding, dilation)


def bottleneck_forward(x, A, cores, C, bias, group_sizes, group_size, stride, padding, dilation):
    """The whole decomposed layer with reference series kernels."""
    return bottleneck_forward_saving(x, A, cores, C, bias, group_sizes, group_size, stride,
                                     padding, dilation)[0]


def bottleneck_backward(grad_y, x, A, cores, C, bias, group_sizes, group_size, stride, padding,
                        dilation, activations=None):
    """Backward of the whole decomposed layer with reference series kernels."""
    return composite_bottleneck_backward(SERIES_FNS, grad_y, x, A, cores, C, bias, group_sizes,
                                         group_size, stride, padding, dilation, activations)
