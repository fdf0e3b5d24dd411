"""Pure-PyTorch reference kernels: vectorised block-diagonal expansion of the series, then F.conv2d.

This is the oracle every other backend is tested against, and the "PyTorch" baseline of the
benchmarks (cuDNN / oneDNN do the convolutions). Functions follow the kernel-level contract in
docs/ARCHITECTURE.md: arguments arrive validated and normalised.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .algebra import effective_core, gather_core


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
