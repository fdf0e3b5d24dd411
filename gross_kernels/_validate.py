"""Argument checks for the public series ops: each failure names the argument and the rule it broke."""
from __future__ import annotations

import functools
from typing import Sequence

import torch

from .geometry import SeriesGeom


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_sequence(value) -> bool:
    # Lists and tuples first: the Sequence ABC check costs microseconds on every call.
    return type(value) in (list, tuple) or (
        not isinstance(value, (torch.Tensor, str, bytes)) and isinstance(value, Sequence))


def pair(name: str, value, minimum: int) -> tuple:
    """An int or a pair of ints ≥ minimum, as a 2-tuple."""
    if _is_int(value):
        value = (value, value)
    if not isinstance(value, (tuple, list)) or len(value) != 2 or not all(_is_int(v) for v in value):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if any(v < minimum for v in value):
        rule = "positive" if minimum == 1 else "non-negative"
        raise ValueError(f"{name} must be {rule}, got {tuple(value)}")
    return tuple(value)


def check_series(group_sizes, S: int, T: int, name: str = "group_sizes") -> tuple:
    """Validate a nested group-size series for bottleneck widths (S, T); returns it as a tuple."""
    if (type(group_sizes) is tuple and all(type(g) is int for g in group_sizes)
            and not torch.compiler.is_compiling()):  # Dynamo traces through caches anyway
        return _checked_series(group_sizes, S, T, name)
    return _check_series(group_sizes, S, T, name)


@functools.lru_cache(maxsize=4096)
def _checked_series(group_sizes: tuple, S: int, T: int, name: str) -> tuple:
    # A layer asks about the same series on every call (failures are not cached: they raise).
    return _check_series(group_sizes, S, T, name)


def _check_series(group_sizes, S, T, name):
    if not _is_sequence(group_sizes):
        raise TypeError(f"{name} must be a sequence of ints, got {type(group_sizes).__name__}")
    if len(group_sizes) == 0:
        raise ValueError(f"{name} must not be empty")
    if not all(_is_int(g) for g in group_sizes):
        raise TypeError(f"{name} must hold ints, got {list(group_sizes)!r}")
    sizes = tuple(group_sizes)
    for g in sizes:
        if g <= 0:
            raise ValueError(f"{name} must be positive, got {g} in {sizes}")
        if S % g:
            raise ValueError(f"{name}: every group size must divide the bottleneck S={S}, {g} does not")
        if T % (S // g):
            raise ValueError(
                f"{name}: the number of groups S//g must divide T={T}, S//{g}={S // g} does not")
    for a, b in zip(sizes, sizes[1:]):
        if b <= a:
            raise ValueError(f"{name} must be strictly increasing, got {sizes}")
        if b % a:
            raise ValueError(f"{name} must be nested (each divides the next), {a} does not divide {b}")
    return sizes


def check_group_size(group_size, group_sizes: tuple) -> int:
    """The active group size must be one of the series' sizes."""
    if not _is_int(group_size):
        raise TypeError(f"group_size must be an int, got {type(group_size).__name__}")
    if group_size not in group_sizes:
        raise ValueError(f"group_size must be one of group_sizes {group_sizes}, got {group_size}")
    return group_size


def _check_tensor(name: str, t, ndim: int, index=None) -> None:
    """t is an `ndim`-D tensor (`name[index]`, or `name` when index is None, in the message)."""
    if not isinstance(t, torch.Tensor) or t.dim() != ndim:
        label = name if index is None else f"{name}[{index}]"
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{label} must be a torch.Tensor, got {type(t).__name__}")
        raise ValueError(f"{label} must be {ndim}-D, got shape {tuple(t.shape)}")


def _check_tensor_list(name: str, tensors, count: int) -> None:
    if not _is_sequence(tensors):
        raise TypeError(f"{name} must be a list of tensors, one per group size")
    if len(tensors) != count:
        raise ValueError(f"{name} must hold one tensor per group size ({count}), got {len(tensors)}")


def _check_like(name: str, index, t: torch.Tensor, ref: torch.Tensor) -> None:
    """t's dtype and device are x's (`name[index]`, or `name` when index is None, in the message)."""
    if t.dtype != ref.dtype or t.device != ref.device:
        label = name if index is None else f"{name}[{index}]"
        if t.dtype != ref.dtype:
            raise TypeError(f"{label} dtype {t.dtype} must match x dtype {ref.dtype}")
        raise ValueError(f"{label} device {t.device} must match x device {ref.device}")


def _check_input(x) -> None:
    _check_tensor("x", x, 4)
    if not x.dtype.is_floating_point:
        raise TypeError(f"x must have a floating dtype, got {x.dtype}")


def _check_cores(cores) -> None:
    if not _is_sequence(cores) or len(cores) == 0:
        raise TypeError("cores must be a non-empty list of tensors, one per group size")
    for i, core in enumerate(cores):
        _check_tensor("cores", core, 4, i)


def check_series_conv(x, cores, group_sizes, group_size, stride, padding, dilation) -> SeriesGeom:
    """Validate `series_grouped_conv2d` arguments; returns them normalised."""
    _check_input(x)
    _check_cores(cores)
    return _check_core_series(x, x.shape[1], cores, group_sizes, group_size, stride, padding,
                              dilation)


def _check_core_series(x, S, cores, group_sizes, group_size, stride, padding, dilation):
    """Checks of the grouped k×k series acting on an S-channel input of x's spatial size."""
    T = cores[0].shape[0]
    sizes = check_series(group_sizes, S, T)
    _check_tensor_list("cores", cores, len(sizes))
    G = check_group_size(group_size, sizes)
    kh, kw = cores[0].shape[2:]
    for i, (core, g) in enumerate(zip(cores, sizes)):
        if tuple(core.shape) != (T, g, kh, kw):
            raise ValueError(
                f"cores[{i}] must have shape (T, g_i, kh, kw) = {(T, g, kh, kw)} "
                f"(S={S} input channels, group size {g}), got {tuple(core.shape)}")
        _check_like("cores", i, core, x)
    stride = pair("stride", stride, 1)
    padding = pair("padding", padding, 0)
    dilation = pair("dilation", dilation, 1)
    for dim, (size, k) in enumerate(zip(x.shape[2:], (kh, kw))):
        span = dilation[dim] * (k - 1) + 1
        if size + 2 * padding[dim] < span:
            raise ValueError(
                f"x spatial size {tuple(x.shape[2:])} with padding {padding} is smaller than the "
                f"dilated kernel {(kh, kw)} (dilation {dilation}): the output would be empty")
    return SeriesGeom(sizes, G, stride, padding, dilation)


def check_bottleneck(x, firsts, cores, lasts, bias, group_sizes, group_size, stride, padding,
                     dilation) -> SeriesGeom:
    """Validate `series_bottleneck_conv2d` arguments; returns them normalised."""
    _check_input(x)
    _check_cores(cores)
    n = len(cores)
    _check_tensor_list("firsts", firsts, n)
    _check_tensor_list("lasts", lasts, n)
    for i in range(n):
        _check_tensor("firsts", firsts[i], 4, i)
        _check_tensor("lasts", lasts[i], 4, i)
    C_in = x.shape[1]
    S, T, C_out = firsts[0].shape[0], cores[0].shape[0], lasts[0].shape[0]
    for i in range(n):
        if tuple(firsts[i].shape) != (S, C_in, 1, 1):
            raise ValueError(f"firsts[{i}] must have shape (S, C_in, 1, 1) = {(S, C_in, 1, 1)}, "
                             f"got {tuple(firsts[i].shape)}")
        if tuple(lasts[i].shape) != (C_out, T, 1, 1):
            raise ValueError(f"lasts[{i}] must have shape (C_out, T, 1, 1) = {(C_out, T, 1, 1)}, "
                             f"got {tuple(lasts[i].shape)}")
        _check_like("firsts", i, firsts[i], x)
        _check_like("lasts", i, lasts[i], x)
    if bias is not None:
        _check_tensor("bias", bias, 1)
        if bias.shape[0] != C_out:
            raise ValueError(f"bias must have shape (C_out,) = ({C_out},), got {tuple(bias.shape)}")
        _check_like("bias", None, bias, x)
    # The core acts on the bottleneck activation u = A·x: S channels, x's spatial size.
    return _check_core_series(x, S, cores, group_sizes, group_size, stride, padding, dilation)
