"""Public series ops: `torch.library` ops (namespace `gross`) with autograd and fake kernels.

Each public function validates its arguments (before any kernel runs), applies autocast, notes
which gradients autograd will want and resolves `auto` to a concrete backend (`backends.resolve`).
A backend made of PyTorch's differentiable ops (reference, channels-last, folded) then runs under
autograd like a plain PyTorch layer; any other calls an op that runs it, whose forward, backward
and fake kernels see that one name. The backward passes are ops too (private, `gross::_…`), so
`torch.compile` traces forward and backward without graph breaks. Outputs follow x's memory format.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from . import _layout, _validate, backends
from .algebra import sum_active
from .backends.base import NO_GRAD, Needs
from .geometry import SeriesGeom


def _new_output(x: Tensor, shape) -> Tensor:
    return x.new_empty(shape).contiguous(memory_format=_layout.format_of(x))


# The ops are registered through torch.library.Library (schema inferred from the implementation's
# annotations, one implementation for every device, a fake kernel) with a Python autograd kernel
# around a torch.autograd.Function: the mechanism of `torch.library.custom_op` without its per-call
# argument flattening (its cost: bench/RESULTS.md, "Ops benchmark (CPU)").
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


def _geom(group_sizes, group_size, stride, padding, dilation) -> SeriesGeom:
    return SeriesGeom(tuple(group_sizes), group_size, tuple(stride), tuple(padding), tuple(dilation))


def _op_backend(op, x, cores, group_sizes, group_size, stride, padding, dilation, backend, needs):
    """The backend a series op call runs (the op given "auto" directly decides here)."""
    return backends.choose(backend, op, x, list(cores),
                           _geom(group_sizes, group_size, stride, padding, dilation),
                           _series_needs(needs))


def _kernels_only(kernels):
    """A backward op's backend: one with backward kernels (a differentiable one never gets here:
    autograd runs its ops)."""
    if kernels.differentiable:
        raise RuntimeError(f"backend {kernels.name!r} runs under autograd: its backward is not "
                           f"one of the gross:: backward ops")
    return kernels


def _term_grads(active, params):
    """Gradients of every term for autograd: the active ones', None for the inactive ones (they
    take no part in the output: no gradient, as a plain PyTorch layer gives an unused weight)."""
    return list(active) + [None] * (len(params) - len(active))


# ---------------------------------------------------------------- series grouped conv ----------
# `needs` = [x, cores]: which gradients the backward will compute (empty for inference).

def _series_needs(needs) -> Needs:
    return Needs(needs[0], False, needs[1], False, False) if needs else NO_GRAD


def _series_impl(x: Tensor, cores: Sequence[Tensor], group_sizes: Sequence[int], group_size: int,
                 stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int],
                 backend: str, needs: Sequence[bool]) -> Tensor:
    kernels = _op_backend("series", x, cores, group_sizes, group_size, stride, padding, dilation,
                          backend, needs)
    return kernels.series_call(x, list(cores), _geom(group_sizes, group_size, stride, padding,
                                                     dilation))


def _series_fake(x, cores, group_sizes, group_size, stride, padding, dilation, backend, needs):
    geom = _geom(group_sizes, group_size, stride, padding, dilation)
    return _new_output(x, (x.shape[0], cores[0].shape[0], *geom.output_hw(x.shape[2:], cores[0].shape[2:])))


def _series_backward_impl(grad: Tensor, x: Tensor, cores: Sequence[Tensor],
                          group_sizes: Sequence[int], group_size: int, stride: Sequence[int],
                          padding: Sequence[int], dilation: Sequence[int], backend: str,
                          needs: Sequence[bool]) -> list[Tensor]:
    """[grad_x or empty, grad of every active core (or empties)]."""
    geom, cores = _geom(group_sizes, group_size, stride, padding, dilation), list(cores)
    wants = _series_needs(needs)
    kernels = _kernels_only(backends.choose(backend, "series", x, cores, geom, wants))
    gx, active = kernels.series_backward_call(grad, x, cores, geom, wants.x, wants.cores)
    out = [x.new_empty(0) if gx is None else gx]
    if not wants.cores:
        return out + [c.new_empty(0) for c in cores[:geom.num_active]]
    return out + [g.contiguous() for g in active]


def _series_backward_fake(grad, x, cores, group_sizes, group_size, stride, padding, dilation,
                          backend, needs):
    wants = _series_needs(needs)
    active = cores[:_geom(group_sizes, group_size, stride, padding, dilation).num_active]
    out = [_new_output(x, x.shape) if wants.x else x.new_empty(0)]
    return out + [torch.empty_like(c, memory_format=torch.contiguous_format) if wants.cores
                  else c.new_empty(0) for c in active]


_series_op = _define("series_grouped_conv2d", _series_impl, _series_fake)
_series_backward_op = _define("_series_grouped_conv2d_backward", _series_backward_impl,
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
        grads = _series_backward_op(grad, x, cores, *ctx.series_args)
        need_x, need_cores = ctx.series_args[-1]
        core_grads = _term_grads(grads[1:], cores) if need_cores else [None] * len(cores)
        return (grads[0] if need_x else None, None, *core_grads)


def _series_autograd(x, cores, *series_args):
    kernels = _op_backend("series", x, cores, *series_args)
    if kernels.differentiable:
        return kernels.series(x, list(cores), _geom(*series_args[:5]))
    if any(series_args[-1]):
        return _SeriesFunction.apply(x, series_args, *cores)
    with _below_autograd():
        return _series_op(x, cores, *series_args)


_LIB.impl("series_grouped_conv2d", _series_autograd, "Autograd")


# ---------------------------------------------------------------- bottleneck -------------------
# `needs` = [x, firsts, cores, lasts, bias] (empty for inference).

def _bottleneck_impl(x: Tensor, firsts: Sequence[Tensor], cores: Sequence[Tensor],
                     lasts: Sequence[Tensor], bias: Optional[Tensor], group_sizes: Sequence[int],
                     group_size: int, stride: Sequence[int], padding: Sequence[int],
                     dilation: Sequence[int], backend: str, needs: Sequence[bool]) -> list[Tensor]:
    """[y], or [y, u, z] when the backend keeps its activations for the backward."""
    geom, cores = _geom(group_sizes, group_size, stride, padding, dilation), list(cores)
    wants = Needs(*needs) if needs else NO_GRAD
    kernels = backends.layer_op_choice(backend, x)
    A, C = sum_active(firsts, geom.num_active), sum_active(lasts, geom.num_active)
    y, activations = kernels.layer_call(x, A, cores, C, bias, geom, wants.any)
    return [y, *activations]


def _bottleneck_fake(x, firsts, cores, lasts, bias, group_sizes, group_size, stride, padding,
                     dilation, backend, needs):
    geom, cores = _geom(group_sizes, group_size, stride, padding, dilation), list(cores)
    out_hw = geom.output_hw(x.shape[2:], cores[0].shape[2:])
    y = _new_output(x, (x.shape[0], lasts[0].shape[0], *out_hw))
    wants = Needs(*needs) if needs else NO_GRAD
    if not wants.any:
        return [y]
    # Which activations exist depends on the backend: the same choice as the implementation's.
    kernels = backends.layer_op_choice(backend, x)
    if not kernels.keeps_activations(x, firsts[0], cores, lasts[0], geom):
        return [y]
    layout = _layout.format_of(x)
    u = x.new_empty(x.shape[0], firsts[0].shape[0], *x.shape[2:]).contiguous(memory_format=layout)
    z = x.new_empty(x.shape[0], cores[0].shape[0], *out_hw).contiguous(memory_format=layout)
    return [y, u, z]


def _bottleneck_backward_impl(grad: Tensor, x: Tensor, firsts: Sequence[Tensor],
                              cores: Sequence[Tensor], lasts: Sequence[Tensor],
                              bias: Optional[Tensor], group_sizes: Sequence[int], group_size: int,
                              stride: Sequence[int], padding: Sequence[int],
                              dilation: Sequence[int], backend: str, needs: Sequence[bool],
                              activations: Sequence[Tensor]) -> list[Tensor]:
    """[grad_x, grad of the summed A, grads of the active cores, grad of the summed C, grad_bias];
    empties where `needs` asks for none. `activations` is [u, z] when the forward kept them, else
    empty (recomputed)."""
    geom, cores = _geom(group_sizes, group_size, stride, padding, dilation), list(cores)
    wants, n = Needs(*needs), geom.num_active
    kernels = _kernels_only(backends.layer_op_choice(backend, x))
    A, C = sum_active(firsts, n), sum_active(lasts, n)
    gx, gA, gcores, gC, gbias = kernels.layer_backward_call(grad, x, A, cores, C, bias, geom,
                                                            wants, activations)

    def given(g, like):
        return like.new_empty(0) if g is None else g.contiguous()

    gcores = [g.contiguous() for g in gcores] if gcores is not None else [
        c.new_empty(0) for c in cores[:n]]
    # grad_x keeps x's layout (layer_backward_call); the weights' gradients are contiguous.
    return [x.new_empty(0) if gx is None else gx, given(gA, firsts[0]), *gcores,
            given(gC, lasts[0]), given(gbias, x)]


def _bottleneck_backward_fake(grad, x, firsts, cores, lasts, bias, group_sizes, group_size,
                              stride, padding, dilation, backend, needs, activations):
    wants = Needs(*needs)
    n = _geom(group_sizes, group_size, stride, padding, dilation).num_active

    def like(params, wanted):
        return [torch.empty_like(p, memory_format=torch.contiguous_format) if wanted
                else p.new_empty(0) for p in params]

    return ([_new_output(x, x.shape) if wants.x else x.new_empty(0)] + like(firsts[:1], wants.A)
            + like(cores[:n], wants.cores) + like(lasts[:1], wants.C)
            + [torch.empty_like(bias) if bias is not None and wants.bias else x.new_empty(0)])


_bottleneck_op = _define("series_bottleneck_conv2d", _bottleneck_impl, _bottleneck_fake)
_bottleneck_backward_op = _define("_series_bottleneck_conv2d_backward",
                                  _bottleneck_backward_impl, _bottleneck_backward_fake)


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
        ctx.series_args = series_args
        return tuple(out)

    @staticmethod
    def backward(ctx, grad_y, *unused_activation_grads):
        x, bias, *rest = ctx.saved_tensors
        n = ctx.num_terms
        params, activations = rest[:3 * n], rest[3 * n:]
        if grad_y is None:  # y took no part in the loss: every gradient is zero
            return (None, None, None) + (None,) * (3 * n)
        firsts, cores, lasts = params[:n], params[n:2 * n], params[2 * n:]
        grad_x, grad_A, *grad_cores, grad_C, grad_bias = _bottleneck_backward_op(
            grad_y, x, firsts, cores, lasts, bias, *ctx.series_args, activations)
        wants, active = Needs(*ctx.series_args[-1]), len(grad_cores)

        def terms(wanted, grads, like):
            return _term_grads(grads, like) if wanted else [None] * n

        # Every active first (last) shares the summed factor's gradient (autograd copies it where
        # it must); inactive terms get none.
        return (grad_x if wants.x else None, grad_bias if bias is not None and wants.bias else None,
                None, *terms(wants.A, [grad_A] * active, firsts),
                *terms(wants.cores, grad_cores, cores), *terms(wants.C, [grad_C] * active, lasts))


def _bottleneck_autograd(x, firsts, cores, lasts, bias, *series_args):
    kernels = backends.layer_op_choice(series_args[5], x)
    if kernels.differentiable:
        return [_differentiable_layer(kernels, x, firsts, cores, lasts, bias,
                                      _geom(*series_args[:5]))]
    if any(series_args[-1]):
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
    dtype = torch.get_autocast_dtype(x.device.type)

    def cast(t):
        if isinstance(t, torch.Tensor):
            return t.to(dtype) if t.dtype.is_floating_point else t
        if isinstance(t, (list, tuple)):
            return [cast(item) for item in t]
        return t

    return tuple(cast(group) for group in tensor_groups)


def _differentiable_layer(kernels, x, firsts, cores, lasts, bias, geom):
    """The layer op on a differentiable backend, under autograd (the active 1×1 terms summed
    there too, so that each gets its gradient)."""
    n = geom.num_active
    return kernels.layer(x, sum_active(firsts, n), list(cores), sum_active(lasts, n), bias, geom)


def _check_backend(backend: str, x: Tensor) -> None:
    """Reject an unknown backend, or a forced one that cannot run x, before any kernel runs."""
    backends.check_name(backend)
    if backend != "auto":
        backends.check_available(backend, x.device, x.dtype)


def series_grouped_conv2d(x, cores, group_sizes, group_size, stride=1, padding=0, dilation=1,
                          backend="auto"):
    """Σ_{i: g_i <= group_size} conv2d(x, cores[i], groups=S // g_i), one fused op."""
    x, cores = _autocast(x, cores)
    geom = _validate.check_series_conv(x, cores, group_sizes, group_size, stride, padding, dilation)
    _check_backend(backend, x)
    needs = [_wants_grad(x), _wants_grad(*cores)]
    needs = needs if any(needs) else []
    name = backends.resolve(backend, "series", x, cores, geom, _series_needs(needs))
    kernels = None if name == "auto" else backends.get(name)
    if kernels is not None and kernels.differentiable:  # plain autograd, no custom op
        return kernels.series(x, list(cores), geom)
    return _series_op(x, list(cores), *geom.as_lists(), name, needs)


def series_bottleneck_conv2d(x, firsts, cores, lasts, bias, group_sizes, group_size, stride=1,
                             padding=0, dilation=1, backend="auto"):
    """The decomposed layer at one group size: 1×1 ΣA_i → series core → 1×1 ΣC_i + bias."""
    x, firsts, cores, lasts, bias = _autocast(x, firsts, cores, lasts, bias)
    geom = _validate.check_bottleneck(x, firsts, cores, lasts, bias, group_sizes, group_size,
                                      stride, padding, dilation)
    _check_backend(backend, x)
    needs = [_wants_grad(x), _wants_grad(*firsts), _wants_grad(*cores), _wants_grad(*lasts),
             _wants_grad(bias)]
    needs = needs if any(needs) else []
    name = backends.resolve(backend, "bottleneck", x, cores, geom,
                            Needs(*needs) if needs else NO_GRAD, firsts, lasts, bias)
    kernels = backends.get(name)
    if kernels.differentiable:  # plain autograd, no custom op
        return _differentiable_layer(kernels, x, firsts, cores, lasts, bias, geom)
    return _bottleneck_op(x, list(firsts), list(cores), list(lasts), bias, *geom.as_lists(), name,
                          needs)[0]
