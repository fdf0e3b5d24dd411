"""The interface every backend implements (`Backend`), and its two kinds: `Differentiable` (made of
PyTorch's differentiable ops: the ops run it under autograd, like a plain PyTorch layer) and
`Kernels` (explicit forward and backward kernels, run through the custom ops' autograd), with
`Composed`: a `Kernels` layer from a backend's series kernels and 1×1 convolutions.

Arguments arrive validated: `x` (N, S, H, W) for the series op or (N, C_in, H, W) for the layer,
any strides; `cores[i]` (T, g_i, kh, kw); `A` = Σ active firsts (S, C_in, 1, 1) and `C` = Σ active
lasts (C_out, T, 1, 1), summed by the op layer; `bias` (C_out,) or None; `geom` a `SeriesGeom`.
Outputs, and x's gradient, come back in x's memory format. Gradients come back for the active
terms only, and None where `needs` says they are not wanted.
"""
from __future__ import annotations

import abc
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from .. import _layout


class Needs(NamedTuple):
    """Which gradients a backward computes: x, the summed first 1×1 A, the cores, the summed last 1×1 C, bias."""

    x: bool = True
    A: bool = True
    cores: bool = True
    C: bool = True
    bias: bool = True

    @property
    def any(self) -> bool:
        """Whether a backward will run at all (a training call)."""
        return any(self)


NO_GRAD = Needs(False, False, False, False, False)
_UNIT = ((1, 1), (0, 0), (1, 1), 1)  # stride, padding, dilation, groups of a 1×1 convolution


def conv_backward(grad_out, x, weight, stride, padding, dilation, groups, need_x=True,
                  need_weight=True, need_bias=False):
    """(grad_x, grad_weight, grad_bias) of a convolution from one ATen backward (the bias
    gradient fused into it, cheaper than a separate reduction); None where not needed."""
    if not (need_x or need_weight or need_bias):
        return None, None, None
    return torch.ops.aten.convolution_backward(
        grad_out, x, weight, [weight.shape[0]] if need_bias else None, list(stride), list(padding),
        list(dilation), False, [0, 0], groups, [need_x, need_weight, need_bias])


def pointwise(x, weight, bias=None):
    """A 1×1 convolution."""
    return F.conv2d(x, weight, bias)


def wanted(needs, grad_x, grad_A, grad_cores, grad_C, grad_bias) -> list:
    """The gradients `needs` asks for, flattened in one order (x, A, active cores, C, bias); a
    wanted one that is missing stays None (and fails `auto`'s check)."""
    return (([grad_x] if needs.x else []) + ([grad_A] if needs.A else [])
            + (list(grad_cores) if needs.cores else []) + ([grad_C] if needs.C else [])
            + ([grad_bias] if needs.bias else []))


class Backend(abc.ABC):
    """One way to run the series ops. `name` is what `backend=` forces and what dispatch reports
    show; `auto` tries a backend where `tunes_on` and `applies` allow, and times `step`."""

    name: str = ""
    differentiable: bool = False  # see `Differentiable`

    @abc.abstractmethod
    def unavailable_reason(self, device: torch.device, dtype: torch.dtype) -> Optional[str]:
        """Why this backend cannot run tensors of this device and dtype here (None: it can)."""

    def tunes_on(self, device: torch.device) -> bool:
        """Whether `auto` may try this backend on `device` (False for debugging-only paths)."""
        return True

    def applies(self, signature) -> bool:
        """Whether this backend is a candidate for a call of this dispatch signature (variants
        that exist only for some layers say no for the others)."""
        return True

    def keeps_activations(self, x, A, cores, C, geom) -> bool:
        """Whether a training forward of the layer op keeps u = A·x and z = core(u) for its backward."""
        return False

    @abc.abstractmethod
    def series_call(self, x, cores, geom):
        """The series op's forward: z = Σ_active conv2d(x, cores[i], groups=S/g_i)."""

    @abc.abstractmethod
    def layer_call(self, x, A, cores, C, bias, geom, training):
        """The layer op's forward: (y, [u, z] when a training forward keeps them, else [])."""

    @abc.abstractmethod
    def step(self, inputs, grad_out):
        """One call as the public function runs it (`inputs`: `_autotune.Inputs`): [output, then the
        gradients of `grad_out` that `inputs.needs` wants, in `wanted` order]; `grad_out` None for
        an inference call. What `auto` checks and times."""

    def __repr__(self):
        return f"<gross_kernels backend {self.name!r}>"


def _vjp(fn, named, wants, grad_out):
    """fn(*named), and the vector-Jacobian products with `grad_out` for the tensors `wants` flags."""
    asked = [i for i, (t, want) in enumerate(zip(named, wants)) if want and t is not None]
    if grad_out is None or not asked:
        with torch.no_grad():
            return fn(*named), []

    def of_asked(*picked):
        full = list(named)
        for i, t in zip(asked, picked):
            full[i] = t
        return fn(*full)

    with torch.enable_grad():
        leaves = [named[i].detach().requires_grad_() for i in asked]
        out = of_asked(*leaves)
        grads = torch.autograd.grad(out, leaves, grad_out)
    return out.detach(), list(grads)


class Differentiable(Backend):
    """A backend made of PyTorch's differentiable ops: `series` and `layer` are its whole
    implementation. The ops run them under autograd, so the backward runs in autograd's own
    engine as for a plain PyTorch layer, computing only the gradients autograd wants."""

    differentiable = True

    def unavailable_reason(self, device, dtype):
        return None

    @abc.abstractmethod
    def series(self, x, cores, geom):
        """The summed series, differentiable, output in x's memory format."""

    @abc.abstractmethod
    def layer(self, x, A, cores, C, bias, geom):
        """The decomposed layer from the summed 1×1 factors, differentiable, output in x's format."""

    def series_call(self, x, cores, geom):
        return self.series(x, cores, geom)

    def layer_call(self, x, A, cores, C, bias, geom, training):
        return self.layer(x, A, cores, C, bias, geom), []

    def step(self, inputs, grad_out):
        x, cores, geom, needs = inputs.x, inputs.cores, inputs.geom, inputs.needs
        n = geom.num_active
        if inputs.op == "series":
            z, grads = _vjp(lambda x, *active: self.series(x, list(active) + cores[n:], geom),
                            [x, *cores[:n]], [needs.x] + [needs.cores] * n, grad_out)
            return [z] + grads
        wants = [needs.x, needs.A, needs.C, needs.bias] + [needs.cores] * n
        y, grads = _vjp(lambda x, A, C, bias, *active: self.layer(
            x, A, list(active) + cores[n:], C, bias, geom),
            [x, inputs.A, inputs.C, inputs.bias, *cores[:n]], wants, grad_out)
        if grad_out is None:
            return [y]
        it = iter(grads)
        got = [next(it) if want and t is not None else None
               for t, want in zip([x, inputs.A, inputs.C, inputs.bias], wants[:4])]
        return [y] + wanted(needs, got[0], got[1], list(it), got[2], got[3])


class Kernels(Backend):
    """A backend with explicit forward and backward kernels, run through the custom ops (their
    autograd saves what `keeps_activations` says and calls the backward kernels)."""

    @abc.abstractmethod
    def series_forward(self, x, cores, geom):
        """z = Σ_active conv2d(x, cores[i], groups=S/g_i)."""

    @abc.abstractmethod
    def series_backward(self, grad_z, x, cores, geom, need_x=True, need_cores=True):
        """(grad_x or None, [grads of the active cores] or None)."""

    @abc.abstractmethod
    def bottleneck_forward(self, x, A, cores, C, bias, geom):
        """y = 1×1 C (series core (1×1 A x)) + bias."""

    def bottleneck_forward_saving(self, x, A, cores, C, bias, geom):
        """(y, u, z): the forward of a backend that keeps its activations."""
        raise NotImplementedError(f"backend {self.name!r} keeps no activations")

    @abc.abstractmethod
    def bottleneck_backward(self, grad_y, x, A, cores, C, bias, geom, needs=Needs(),
                            activations=None):
        """(grad_x, grad_A, [grads of the active cores], grad_C, grad_bias), None where not needed.

        `activations` = (u, z) kept by `bottleneck_forward_saving`, or None (recompute them).
        """

    # --- the calls as the ops make them: outputs, and x's gradient, in x's memory format; the
    # kept activations in the backend's layout.
    def series_call(self, x, cores, geom):
        return _layout.to_memory_format(self.series_forward(x, cores, geom), _layout.format_of(x))

    def series_backward_call(self, grad_z, x, cores, geom, need_x, need_cores):
        """The series op's backward: (grad_x or None, [active grads] or None)."""
        fmt = _layout.format_of(x)
        grad_x, grad_cores = self.series_backward(_layout.to_memory_format(grad_z, fmt), x, cores,
                                                  geom, need_x, need_cores)
        return (None if grad_x is None else _layout.to_memory_format(grad_x, fmt)), grad_cores

    def layer_call(self, x, A, cores, C, bias, geom, training):
        fmt = _layout.format_of(x)
        if training and self.keeps_activations(x, A, cores, C, geom):
            y, u, z = self.bottleneck_forward_saving(x, A, cores, C, bias, geom)
            return (_layout.to_memory_format(y, fmt),
                    [_layout.to_memory_format(u, fmt), _layout.to_memory_format(z, fmt)])
        return _layout.to_memory_format(self.bottleneck_forward(x, A, cores, C, bias, geom), fmt), []

    def layer_backward_call(self, grad_y, x, A, cores, C, bias, geom, needs, activations):
        """The layer op's backward (`activations`: what `layer_call` kept)."""
        fmt = _layout.format_of(x)
        grad_x, *rest = self.bottleneck_backward(_layout.to_memory_format(grad_y, fmt), x, A,
                                                 cores, C, bias, geom, needs,
                                                 tuple(activations) if activations else None)
        return ((None if grad_x is None else _layout.to_memory_format(grad_x, fmt)), *rest)

    def step(self, inputs, grad_out):
        x, cores, geom, needs = inputs.x, inputs.cores, inputs.geom, inputs.needs
        if inputs.op == "series":
            z = self.series_call(x, cores, geom)
            if grad_out is None:
                return [z]
            gx, gcores = self.series_backward_call(grad_out, x, cores, geom, needs.x, needs.cores)
            return [z] + wanted(needs, gx, None, gcores, None, None)
        A, C, bias = inputs.A, inputs.C, inputs.bias
        y, activations = self.layer_call(x, A, cores, C, bias, geom, grad_out is not None)
        if grad_out is None:
            return [y]
        return [y] + wanted(needs, *self.layer_backward_call(grad_out, x, A, cores, C, bias, geom,
                                                             needs, activations))


class Composed(Kernels):
    """A layer composed of 1×1 convolutions around the backend's own series kernels; it keeps u, z."""

    def bottleneck_forward(self, x, A, cores, C, bias, geom):
        return self.bottleneck_forward_saving(x, A, cores, C, bias, geom)[0]

    def keeps_activations(self, x, A, cores, C, geom) -> bool:
        return True

    def bottleneck_forward_saving(self, x, A, cores, C, bias, geom):
        u = pointwise(x, A)
        z = self.series_forward(u, cores, geom)
        return pointwise(z, C, bias), u, z

    def bottleneck_backward(self, grad_y, x, A, cores, C, bias, geom, needs=Needs(),
                            activations=None):
        if activations is None:
            u = pointwise(x, A)
            z = self.series_forward(u, cores, geom)
        else:
            u, z = activations
        # Each stage runs only for what a needed gradient depends on (no grad_x for a frozen x).
        need_u = needs.x or needs.A
        need_z = need_u or needs.cores
        grad_z, grad_C, grad_bias = conv_backward(grad_y, z, C, *_UNIT, need_x=need_z,
                                                  need_weight=needs.C,
                                                  need_bias=needs.bias and bias is not None)
        grad_u = grad_cores = grad_x = grad_A = None
        if need_z:
            grad_u, grad_cores = self.series_backward(grad_z, u, cores, geom, need_x=need_u,
                                                      need_cores=needs.cores)
        if need_u:
            grad_x, grad_A, _ = conv_backward(grad_u, x, A, *_UNIT, need_x=needs.x,
                                              need_weight=needs.A)
        return grad_x, grad_A, grad_cores, grad_C, grad_bias
