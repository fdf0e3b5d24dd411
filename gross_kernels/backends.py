"""Backend registry: which kernels exist on this machine, and the deterministic `auto` choice."""
from __future__ import annotations

import functools
from types import SimpleNamespace

import torch

from . import _extension, _layout, _validate, folded, reference

BACKENDS = ("reference", "cpp", "triton", "cuda")
# What `auto` runs on the CPU (not a public name): the reference kernels, folded into one
# convolution or on channels-last tensors where either is faster (`_cpu_auto`).
CPU_AUTO = "reference:cpu_auto"


class BackendUnavailableError(RuntimeError):
    """A backend was forced (`backend="..."`) but cannot run these tensors here."""


def _compiled_series_fns():
    """The extension's dispatcher ops (CPU or CUDA kernel chosen by the tensors' device)."""
    ops = torch.ops.gross

    def forward(x, cores, group_sizes, group_size, stride, padding, dilation):
        return ops.series_conv_forward(x, cores, group_sizes, group_size, stride, padding,
                                       dilation)

    def backward_input(grad_z, cores, group_sizes, group_size, x_shape, stride, padding,
                       dilation):
        return ops.series_conv_backward_input(grad_z, cores, group_sizes, group_size,
                                              list(x_shape), stride, padding, dilation)

    def backward_weight(grad_z, x, cores, group_sizes, group_size, stride, padding, dilation):
        return ops.series_conv_backward_weight(grad_z, x, cores, group_sizes, group_size, stride,
                                               padding, dilation)

    return forward, backward_input, backward_weight


def _composite(series_fns):
    """A backend from its three series kernels; the bottleneck composes them with 1×1 convs."""
    forward, backward_input, backward_weight = series_fns

    def backward(grad_z, u, cores, group_sizes, group_size, stride, padding, dilation):
        grad_u = backward_input(grad_z, cores, group_sizes, group_size, u.shape, stride, padding,
                                dilation)
        return grad_u, backward_weight(grad_z, u, cores, group_sizes, group_size, stride, padding,
                                       dilation)

    def forward_saving(*args):
        return reference.composite_bottleneck_activations(forward, *args)

    def composite_forward(*args):
        return forward_saving(*args)[0]

    def composite_backward(*args, activations=None):
        return reference.composite_bottleneck_backward((forward, backward), *args,
                                                       activations=activations)

    return SimpleNamespace(series_forward=forward, series_backward_input=backward_input,
                           series_backward_weight=backward_weight,
                           bottleneck_forward=composite_forward,
                           bottleneck_forward_saving=forward_saving,
                           bottleneck_backward=composite_backward)


def _with_fused_cuda_bottleneck(backend):
    """Use the extension's fused CUDA bottleneck forward where its fit rule says it fits."""
    composite_forward = backend.bottleneck_forward

    def forward(x, A, cores, C, bias, group_sizes, group_size, stride, padding, dilation):
        S, T = A.shape[0], cores[0].shape[0]
        if x.dtype != torch.float64 and torch.ops.gross.series_bottleneck_fits(
                S, T, list(cores[0].shape[2:]), list(stride), list(dilation)):
            return torch.ops.gross.series_bottleneck_forward(
                x, A, cores, C, bias, group_sizes, group_size, stride, padding, dilation)
        return composite_forward(x, A, cores, C, bias, group_sizes, group_size, stride, padding,
                                 dilation)

    backend.bottleneck_forward = forward
    return backend


def _gains_from_channels_last(x: torch.Tensor, group_size: int, training: bool) -> bool:
    """Whether oneDNN runs this layer faster on channels-last tensors, conversions included.

    Measured on the paper's layers (bench/RESULTS.md, "Ops benchmark (CPU)"), conversions by
    `gross::relayout`. A training step (five conversions for six convolution passes) gains on
    images of 8×8 and up, with a depthwise core (group size 1) at any size, and with at most 64
    channels; it loses 3-10 % on the deep 4×4 and 2×2 layers with 512 channels and a grouped core.
    An inference forward (two conversions for three convolutions) gains 6-12 % with at most 64
    channels and 13-18 % on large images with at least as many pixels as channels (16×16 with
    128 channels); on the deep layers it is a wash.
    """
    pixels, channels = x.shape[2] * x.shape[3], x.shape[1]
    if training:
        return pixels >= 64 or group_size == 1 or channels <= 64
    return channels <= 64 or pixels >= max(channels, 128)


def _folds(x, A, cores, C, group_size, stride, padding, dilation) -> bool:
    """Whether the layer runs as one convolution with the folded weight (see `folded.pays`)."""
    kernel = tuple(cores[0].shape[2:])
    out_hw = _validate.output_hw(x.shape[2:], kernel, stride, padding, dilation)
    return folded.pays(tuple(x.shape), A.shape[0], cores[0].shape[0], C.shape[0], kernel,
                       group_size, out_hw)


def cpu_auto_path(x, A, cores, C, group_size, stride, padding, dilation, training) -> str:
    """What the CPU `auto` runs for this float32 layer: "folded", "channels-last" or "reference"."""
    if _folds(x, A, cores, C, group_size, stride, padding, dilation):
        return "folded"
    return "channels-last" if _gains_from_channels_last(x, group_size, training) else "reference"


def _cpu_auto(backend):
    """The CPU's fastest form of the backend's bottleneck, chosen per layer shape.

    A dense core (one group) folds into one convolution where that costs fewer operations
    (`folded`). Otherwise the three convolutions run on channels-last tensors where that is
    faster: oneDNN's CPU convolutions work in a channels-last (nhwc) layout and, handed NCHW
    tensors, reorder every input and output; converting x (and the incoming gradient) once
    avoids those reorders. The saved activations u, z then stay channels-last
    (`activation_layout`); the folded form saves none (`keeps_activations`). Both are read by
    the ops' fake kernels.
    """
    def channels_last(t):
        return _layout.to_memory_format(t, torch.channels_last)

    def activation_layout(x, group_size):
        return torch.channels_last if _gains_from_channels_last(x, group_size, training=True) else None

    def keeps_activations(x, A, cores, C, group_size, stride, padding, dilation):
        return not _folds(x, A, cores, C, group_size, stride, padding, dilation)

    def forward_saving(x, A, cores, C, bias, group_sizes, group_size, *geometry):
        x = channels_last(x) if _gains_from_channels_last(x, group_size, training=True) else x
        return backend.bottleneck_forward_saving(x, A, cores, C, bias, group_sizes, group_size,
                                                 *geometry)

    def forward(x, A, cores, C, bias, group_sizes, group_size, stride, padding, dilation):
        args = (A, cores, C, bias, group_sizes, group_size, stride, padding, dilation)
        path = cpu_auto_path(x, A, cores, C, group_size, stride, padding, dilation, training=False)
        if path == "folded":
            return folded.bottleneck_forward(x, *args)
        return backend.bottleneck_forward(channels_last(x) if path == "channels-last" else x, *args)

    def backward(grad_y, x, A, cores, C, bias, group_sizes, group_size, stride, padding,
                 dilation, activations=None):
        args = (A, cores, C, bias, group_sizes, group_size, stride, padding, dilation)
        # The folded form kept no activations (`keeps_activations`), so a path of "folded"
        # always arrives here without them.
        path = cpu_auto_path(x, A, cores, C, group_size, stride, padding, dilation, training=True)
        if path == "folded":
            return folded.bottleneck_backward(grad_y, x, *args)
        if path == "channels-last":
            grad_y, x = channels_last(grad_y), channels_last(x)
        return backend.bottleneck_backward(grad_y, x, *args, activations=activations)

    return SimpleNamespace(series_forward=backend.series_forward,
                           series_backward_input=backend.series_backward_input,
                           series_backward_weight=backend.series_backward_weight,
                           bottleneck_forward=forward, bottleneck_forward_saving=forward_saving,
                           bottleneck_backward=backward, activation_layout=activation_layout,
                           keeps_activations=keeps_activations)


@functools.lru_cache(maxsize=None)
def _backend(name: str):
    if name == "reference":
        return reference
    if name == CPU_AUTO:
        return _cpu_auto(reference)
    if name == "triton":
        from . import triton as triton_kernels
        return triton_kernels
    compiled = _composite(_compiled_series_fns())
    return _with_fused_cuda_bottleneck(compiled) if name == "cuda" else compiled


def _triton_ready(device: torch.device):
    try:
        from . import triton as triton_kernels
    except Exception as error:  # triton missing or broken: report why, never crash the import
        return False, f"Triton could not be imported ({error})"
    return triton_kernels.is_available(device)


def unavailable_reason(name: str, device: torch.device, dtype: torch.dtype):
    """Why backend `name` cannot run tensors of this device and dtype (None if it can)."""
    if name == "reference":
        return None
    if name == "cpp":
        if not _extension.load():
            return f"the compiled extension gross_kernels._C is not available ({_extension.error()})"
        if not _extension.has_cpu_kernels():
            return "gross_kernels._C has no CPU kernels registered"
        if device.type != "cpu":
            return f"the cpp backend runs CPU tensors only, got device {device}"
        if dtype not in (torch.float32, torch.float64):
            return f"the cpp backend supports float32 and float64, got {dtype}"
        return None
    if name == "cuda":
        if device.type != "cuda":
            return f"the cuda backend runs CUDA tensors only, got device {device}"
        if not _extension.has_cuda_kernels():
            return "gross_kernels._C was built without CUDA kernels (GROSS_CUDA=0 or no toolkit)"
        if dtype not in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
            return f"the cuda backend supports float32, float64, float16 and bfloat16, got {dtype}"
        return None
    if name == "triton":
        ok, reason = _triton_ready(device)
        if not ok:
            return reason
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            return f"the triton backend supports float32, float16 and bfloat16, got {dtype}"
        return None
    raise ValueError(f"backend must be one of {('auto',) + BACKENDS}, got {name!r}")


def available_backends(device=None) -> list:
    """Backends that can run on this machine (on `device` if given, else on any local device)."""
    devices = [torch.device(device)] if device is not None else [torch.device("cpu")] + (
        [torch.device("cuda")] if torch.cuda.is_available() else [])
    dtype = torch.float32
    return [name for name in BACKENDS
            if any(unavailable_reason(name, d, dtype) is None for d in devices)]


def _auto_choice(device: torch.device, dtype: torch.dtype) -> str:
    """The fastest correct backend for this device and dtype (see bench/RESULTS.md)."""
    if device.type == "cuda":
        for name in ("triton", "cuda"):
            if unavailable_reason(name, device, dtype) is None:
                return name
        return "reference"
    # On the CPU, oneDNN's grouped convolution on the summed weight beats our direct C++ loops
    # on every benchmarked layer shape; for float32, folding a dense core and channels-last
    # tensors on large images beat it in turn (bench/RESULTS.md, "Ops benchmark (CPU)").
    return CPU_AUTO if dtype == torch.float32 else "reference"


def check_available(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """The concrete backend `backend` stands for here; raises if a forced one cannot run."""
    if backend == "auto":
        return _auto_choice(device, dtype)
    reason = unavailable_reason(backend, device, dtype)
    if reason is not None:
        raise BackendUnavailableError(f"backend={backend!r} is unavailable: {reason}")
    return backend


def resolve(backend: str, device: torch.device, dtype: torch.dtype):
    """The kernel module for `backend` on these tensors; raises if a forced backend cannot run."""
    return _backend(check_available(backend, device, dtype))
