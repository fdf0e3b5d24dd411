"""Memory-format conversion of activations, by the extension's CPU transpose kernel where it applies."""
import torch
from torch import Tensor

from . import _extension


def format_of(x: Tensor) -> torch.memory_format:
    """x's memory format as the ops keep it for their outputs: channels-last or contiguous."""
    return torch.channels_last if (
        x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    ) else torch.contiguous_format


def to_memory_format(t: Tensor, memory_format: torch.memory_format) -> Tensor:
    """t in `memory_format` (t itself when it already is); dense NCHW <-> channels-last on the CPU
    goes through `gross::relayout`, several times faster than ATen's strided copy on small images."""
    if t.is_contiguous(memory_format=memory_format):
        return t
    if memory_format in (torch.channels_last, torch.contiguous_format) and _relayout_applies(t):
        other = torch.contiguous_format if memory_format == torch.channels_last else torch.channels_last
        if t.is_contiguous(memory_format=other):
            return torch.ops.gross.relayout(t, memory_format == torch.channels_last)
    return t.contiguous(memory_format=memory_format)


def _relayout_applies(t: Tensor) -> bool:
    # The kernel copies raw real elements (no complex dtypes, no lazy conjugate / negative views).
    return (t.dim() == 4 and t.device.type == "cpu" and not t.is_complex() and not t.is_neg()
            and _extension.has_relayout())


if _extension.has_relayout():
    @torch.library.register_fake("gross::relayout")
    def _relayout_fake(x, channels_last):
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        return torch.empty_like(x, memory_format=fmt)

    # Differentiable: the gradient goes back to the input's layout (the opposite transpose).
    def _relayout_backward(ctx, grad):
        return to_memory_format(grad, ctx.input_format), None

    def _relayout_setup(ctx, inputs, output):
        ctx.input_format = torch.contiguous_format if inputs[1] else torch.channels_last

    torch.library.register_autograd("gross::relayout", _relayout_backward,
                                    setup_context=_relayout_setup)
