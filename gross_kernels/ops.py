"""Public series ops: `torch.library` custom ops (namespace `gross`) with autograd and fake kernels.

Each public function validates its arguments (before any kernel runs), applies autocast, then
calls a custom op whose implementation dispatches to the chosen backend's kernels. The backward
passes are custom ops too, so `torch.compile` traces forward and backward without graph breaks.
Outputs follow x's memory format (channels-last in, channels-last out).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from . import _layout, _validate, backends


def _memory_format(x: Tensor):
    return torch.channels_last if (
        x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    ) else torch.contiguous_format


def _new_output(x: Tensor, shape) -> Tensor:
    return x.new_empty(shape).contiguous(memory_format=_memory_format(x))


# The ops are registered through torch.library.Library (schema inferred from the implementation's
# annotations, one implementation for every device, a fake kernel) with a Python autograd kernel
# around a torch.autograd.Function: the mechanism `torch.library.custom_op` uses, without its
# per-call argument flattening and checks, which cost about 0.4 ms per training step of a layer
# (bench/RESULTS.md).
_LIB = torch.library.Library("gross", "FRAGMENT")


def _define(name, impl, fake):
    """Register gross::name with `impl` on every device and `fake` for tracing; returns the op."""
    _LIB.define(name + torch.library.infer_schema(impl, mutates_args=()))
    _LIB.impl(name, impl, "CompositeExplicitAutograd")
    torch.library.register_fake(f"gross::{name}", fake, lib=_LIB)
    return getattr(torch.ops.gross, name).default


def _wants_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _below_autograd():
    """Dispatch the op's own implementation (the autograd kernel has already run)."""
    return torch._C._AutoDispatchBelowAutograd()


# ---------------------------------------------------------------- series grouped conv ----------

def _series_impl(x: Tensor, cores: Sequence[Tensor], group_sizes: Sequence[int], group_size: int,
                 stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int],
                 backend: str) -> Tensor:
    kernels = backends.resolve(backend, x.device, x.dtype)
    z = kernels.series_forward(x, list(cores), tuple(group_sizes), group_size, tuple(stride),
                               tuple(padding), tuple(dilation))
    return _layout.to_memory_format(z, _memory_format(x))


def _series_fake(x, cores, group_sizes, group_size, stride, padding, dilation, backend):
    T, _, kh, kw = cores[0].shape
    out_hw = _validate.output_hw(x.shape[2:], (kh, kw), stride, padding, dilation)
    return _new_output(x, (x.shape[0], T, *out_hw))


def _series_backward_impl(grad: Tensor, x: Tensor, cores: Sequence[Tensor],
                          group_sizes: Sequence[int], group_size: int, stride: Sequence[int],
                          padding: Sequence[int], dilation: Sequence[int], backend: str,
                          input_grad: bool, weight_grad: bool) -> list[Tensor]:
    """[grad_x or empty, grad of every core (zeros for inactive terms) or empties]."""
    kernels = backends.resolve(backend, x.device, x.dtype)
    series = (tuple(group_sizes), group_size)
    geometry = (tuple(stride), tuple(padding), tuple(dilation))
    cores = list(cores)
    grad = _layout.to_memory_format(grad, _memory_format(x))
    out = [x.new_empty(0)]
    if input_grad:
        gx = kernels.series_backward_input(grad, cores, *series, x.shape, *geometry)
        out[0] = _layout.to_memory_format(gx, _memory_format(x))
    if weight_grad:
        active = kernels.series_backward_weight(grad, x, cores, *series, *geometry)
        out += [g.contiguous() for g in active]
        out += [torch.zeros_like(c) for c in cores[len(active):]]
    else:
        out += [c.new_empty(0) for c in cores]
    return out


def _series_backward_fake(grad, x, cores, group_sizes, group_size, stride, padding, dilation,
                          backend, input_grad, weight_grad):
    out = [_new_output(x, x.shape) if input_grad else x.new_empty(0)]
    return out + [torch.empty_like(c, memory_format=torch.contiguous_format) if weight_grad
                  else c.new_empty(0) for c in cores]


_series_op = _define("series_grouped_conv2d", _series_impl, _series_fake)
_series_backward_op = _define("series_grouped_conv2d_backward", _series_backward_impl,
                              _series_backward_fake)


class _SeriesFunction(torch.autograd.Function):
    """Autograd of gross::series_grouped_conv2d: the backward op for x and the cores."""

    @staticmethod
    def forward(ctx, x, series_args, *cores):
        with _below_autograd():
            z = _series_op(x, cores, *series_args)
        ctx.save_for_backward(x, *cores)
        ctx.series_args = series_args
        return z

    @staticmethod
    def backward(ctx, grad):
        x, *cores = ctx.saved_tensors
        need_x, need_w = ctx.needs_input_grad[0], any(ctx.needs_input_grad[2:])
        grads = _series_backward_op(grad, x, cores, *ctx.series_args, need_x, need_w)
        core_grads = grads[1:] if need_w else [None] * len(cores)
        return (grads[0] if need_x else None, None, *core_grads)


def _series_autograd(x, cores, *series_args):
    if _wants_grad(x, *cores):
        return _SeriesFunction.apply(x, series_args, *cores)
    with _below_autograd():
        return _series_op(x, cores, *series_args)


_LIB.impl("series_grouped_conv2d", _series_autograd, "Autograd")


# ---------------------------------------------------------------- bottleneck -------------------

def _summed(tensors, count):
    total = tensors[0]
    for t in tensors[1:count]:
        total = total + t
    return total


def _saves_activations(kernels, save_activations: bool, x, firsts, cores, lasts, group_size,
                       stride, padding, dilation) -> bool:
    """Whether the forward keeps u = A·x and z = core(u) for the backward (composite backends;
    a backend may decide per layer through `keeps_activations`)."""
    if not (save_activations and hasattr(kernels, "bottleneck_forward_saving")):
        return False
    keeps = getattr(kernels, "keeps_activations", None)
    return keeps is None or keeps(x, firsts[0], cores, lasts[0], group_size, stride, padding,
                                  dilation)


def _activation_layout(kernels, x: Tensor, group_size: int):
    """Memory format of the saved activations u, z: the backend's choice for the layer, else x's."""
    choose = getattr(kernels, "activation_layout", None)
    return (choose(x, group_size) if choose is not None else None) or _memory_format(x)


def _bottleneck_impl(x: Tensor, firsts: Sequence[Tensor], cores: Sequence[Tensor],
                     lasts: Sequence[Tensor], bias: Optional[Tensor], group_sizes: Sequence[int],
                     group_size: int, stride: Sequence[int], padding: Sequence[int],
                     dilation: Sequence[int], backend: str, save_activations: bool) -> list[Tensor]:
    """[y], or [y, u, z] when the backend keeps its activations for the backward."""
    kernels = backends.resolve(backend, x.device, x.dtype)
    n = sum(1 for g in group_sizes if g <= group_size)
    args = (x, _summed(firsts, n), list(cores), _summed(lasts, n), bias, tuple(group_sizes),
            group_size, tuple(stride), tuple(padding), tuple(dilation))
    if _saves_activations(kernels, save_activations, x, firsts, cores, lasts, group_size,
                          tuple(stride), tuple(padding), tuple(dilation)):
        y, u, z = kernels.bottleneck_forward_saving(*args)
        layout = _activation_layout(kernels, x, group_size)
        return [_layout.to_memory_format(y, _memory_format(x)), _layout.to_memory_format(u, layout),
                _layout.to_memory_format(z, layout)]
    return [_layout.to_memory_format(kernels.bottleneck_forward(*args), _memory_format(x))]


def _bottleneck_fake(x, firsts, cores, lasts, bias, group_sizes, group_size, stride, padding,
                     dilation, backend, save_activations):
    kh, kw = cores[0].shape[2:]
    out_hw = _validate.output_hw(x.shape[2:], (kh, kw), stride, padding, dilation)
    y = _new_output(x, (x.shape[0], lasts[0].shape[0], *out_hw))
    kernels = backends.resolve(backend, x.device, x.dtype)
    if not _saves_activations(kernels, save_activations, x, firsts, cores, lasts, group_size,
                              tuple(stride), tuple(padding), tuple(dilation)):
        return [y]
    layout = _activation_layout(kernels, x, group_size)
    u = x.new_empty(x.shape[0], firsts[0].shape[0], *x.shape[2:]).contiguous(memory_format=layout)
    z = x.new_empty(x.shape[0], cores[0].shape[0], *out_hw).contiguous(memory_format=layout)
    return [y, u, z]


def _bottleneck_backward_impl(grad: Tensor, x: Tensor, firsts: Sequence[Tensor],
                              cores: Sequence[Tensor], lasts: Sequence[Tensor],
                              bias: Optional[Tensor], group_sizes: Sequence[int], group_size: int,
                              stride: Sequence[int], padding: Sequence[int],
                              dilation: Sequence[int], backend: str,
                              activations: Sequence[Tensor]) -> list[Tensor]:
    """[grad_x, grads of firsts, grads of cores, grads of lasts, grad_bias (empty if no bias)].

    Every active first (last) gets the gradient of the summed A (C); inactive terms get zeros.
    `activations` is [u, z] when the forward kept them, else empty (the backend recomputes).
    """
    kernels = backends.resolve(backend, x.device, x.dtype)
    n = sum(1 for g in group_sizes if g <= group_size)
    grad = _layout.to_memory_format(grad, _memory_format(x))
    args = (grad, x, _summed(firsts, n), list(cores), _summed(lasts, n), bias, tuple(group_sizes),
            group_size, tuple(stride), tuple(padding), tuple(dilation))
    if activations:
        gx, gA, gcores, gC, gbias = kernels.bottleneck_backward(*args,
                                                                activations=tuple(activations))
    else:
        gx, gA, gcores, gC, gbias = kernels.bottleneck_backward(*args)

    def per_term(active_grads, params):
        active = [g.contiguous() for g in active_grads]
        return active + [torch.zeros_like(p) for p in params[len(active):]]

    gA = gA.contiguous()
    gC = gC.contiguous()
    return ([_layout.to_memory_format(gx, _memory_format(x))]
            + per_term([gA] + [gA.clone() for _ in range(n - 1)], firsts)
            + per_term(gcores, cores)
            + per_term([gC] + [gC.clone() for _ in range(n - 1)], lasts)
            + [gbias.contiguous() if bias is not None else x.new_empty(0)])


def _bottleneck_backward_fake(grad, x, firsts, cores, lasts, bias, group_sizes, group_size,
                              stride, padding, dilation, backend, activations):
    like = [torch.empty_like(p, memory_format=torch.contiguous_format)
            for p in (*firsts, *cores, *lasts)]
    return ([_new_output(x, x.shape)] + like
            + [torch.empty_like(bias) if bias is not None else x.new_empty(0)])


_bottleneck_op = _define("series_bottleneck_conv2d", _bottleneck_impl, _bottleneck_fake)
_bottleneck_backward_op = _define("series_bottleneck_conv2d_backward", _bottleneck_backward_impl,
                                  _bottleneck_backward_fake)


class _BottleneckFunction(torch.autograd.Function):
    """Autograd of gross::series_bottleneck_conv2d: y differentiable, the activations u, z not."""

    @staticmethod
    def forward(ctx, x, bias, series_args, *params):
        n = len(params) // 3
        firsts, cores, lasts = params[:n], params[n:2 * n], params[2 * n:]
        with _below_autograd():
            out = _bottleneck_op(x, firsts, cores, lasts, bias, *series_args)
        activations = out[1:]  # [u, z] when the forward kept them
        ctx.mark_non_differentiable(*activations)
        # u and z are never used outside the op: without this, autograd would hand the backward
        # freshly zero-filled gradients of their (full activation) size on every step.
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, bias, *params, *activations)
        ctx.num_terms = n
        ctx.series_args = series_args[:-1]  # without save_activations
        return tuple(out)

    @staticmethod
    def backward(ctx, grad_y, *unused_activation_grads):
        x, bias, *rest = ctx.saved_tensors
        n = ctx.num_terms
        params, activations = rest[:3 * n], rest[3 * n:]
        if grad_y is None:  # y took no part in the loss: every gradient is zero
            return (None, None, None) + (None,) * (3 * n)
        grads = _bottleneck_backward_op(grad_y, x, params[:n], params[n:2 * n], params[2 * n:],
                                        bias, *ctx.series_args, activations)
        return (grads[0], grads[-1] if bias is not None else None, None, *grads[1:1 + 3 * n])


def _bottleneck_autograd(x, firsts, cores, lasts, bias, *series_args):
    if _wants_grad(x, *firsts, *cores, *lasts, bias):
        return list(_BottleneckFunction.apply(x, bias, series_args, *firsts, *cores, *lasts))
    with _below_autograd():
        return _bottleneck_op(x, firsts, cores, lasts, bias, *series_args)


_LIB.impl("series_bottleneck_conv2d", _bottleneck_autograd, "Autograd")


# ---------------------------------------------------------------- public API -------------------

def _autocast(*tensor_groups):
    """Cast floating tensors to the autocast dtype when autocast is on for their device."""
    x = tensor_groups[0]
    if not isinstance(x, torch.Tensor) or not torch.is_autocast_enabled(x.device.type):
        return tensor_groups  # bad input is reported by the validation that follows
    device_type = x.device.type
    dtype = torch.get_autocast_dtype(device_type)

    def cast(t):
        if isinstance(t, torch.Tensor):
            return t.to(dtype) if t.dtype.is_floating_point else t
        if isinstance(t, (list, tuple)):
            return [cast(item) for item in t]
        return t

    return tuple(cast(group) for group in tensor_groups)


def _check_backend(backend: str, x: Tensor) -> None:
    """Reject an unknown backend, or a forced one that cannot run x, before any kernel runs."""
    _validate.check_backend(backend)
    backends.check_available(backend, x.device, x.dtype)


def series_grouped_conv2d(x, cores, group_sizes, group_size, stride=1, padding=0, dilation=1,
                          backend="auto"):
    """Σ_{i: g_i <= group_size} conv2d(x, cores[i], groups=S // g_i), one fused op."""
    x, cores = _autocast(x, cores)
    a = _validate.check_series_conv(x, cores, group_sizes, group_size, stride, padding, dilation)
    _check_backend(backend, x)
    return _series_op(x, list(cores), list(a.group_sizes), a.group_size, list(a.stride),
                      list(a.padding), list(a.dilation), backend)


def series_bottleneck_conv2d(x, firsts, cores, lasts, bias, group_sizes, group_size, stride=1,
                             padding=0, dilation=1, backend="auto"):
    """The decomposed layer at one group size: 1×1 ΣA_i → series core → 1×1 ΣC_i + bias."""
    x, firsts, cores, lasts, bias = _autocast(x, firsts, cores, lasts, bias)
    a = _validate.check_bottleneck(x, firsts, cores, lasts, bias, group_sizes, group_size, stride,
                                   padding, dilation)
    _check_backend(backend, x)
    tensors = [x, *firsts, *cores, *lasts] + ([bias] if bias is not None else [])
    save_activations = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    return _bottleneck_op(x, list(firsts), list(cores), list(lasts), bias, list(a.group_sizes),
                          a.group_size, list(a.stride), list(a.padding), list(a.dilation),
                          backend, save_activations)[0]
