"""The CPU NCHW <-> channels-last transpose kernel (`gross::relayout`) and `_layout.to_memory_format`."""
import pytest
import torch

from gross_kernels import _extension, _layout

pytestmark = pytest.mark.skipif(not _extension.has_relayout(),
                                reason=f"relayout kernel not built: {_extension.error()}")

FORMATS = [(torch.contiguous_format, torch.channels_last), (torch.channels_last, torch.contiguous_format)]
# Tails on both sides of the 4-wide strips and SSE blocks: C and H·W not multiples of 4, 1-sized dims.
SHAPES = [(2, 3, 5, 7), (1, 4, 4, 4), (3, 8, 1, 1), (2, 33, 9, 3), (4, 64, 16, 16), (1, 5, 1, 9),
          (2, 1, 3, 3), (5, 130, 2, 3)]


def _random(shape, dtype, gen):
    x = torch.randn(*shape, generator=gen) * 7
    return x > 0 if dtype == torch.bool else x.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16,
                                   torch.int64, torch.uint8, torch.bool])
@pytest.mark.parametrize("source, target", FORMATS)
def test_relayout_copies_every_element_into_the_target_layout(dtype, source, target):
    gen = torch.Generator().manual_seed(7)
    for shape in SHAPES:
        x = _random(shape, dtype, gen).contiguous(memory_format=source)
        y = _layout.to_memory_format(x, target)
        assert y.is_contiguous(memory_format=target), shape
        assert torch.equal(y, x), shape
        assert y.data_ptr() != x.data_ptr() or x.is_contiguous(memory_format=target)


def test_relayout_op_runs_only_on_tensors_dense_in_the_other_layout():
    x = torch.randn(2, 6, 5, 5)
    y = torch.ops.gross.relayout(x, True)
    assert y.is_contiguous(memory_format=torch.channels_last) and torch.equal(y, x)
    assert torch.equal(torch.ops.gross.relayout(y, False), x)
    with pytest.raises(RuntimeError, match="dense in the NCHW layout"):
        torch.ops.gross.relayout(y, True)
    with pytest.raises(RuntimeError, match="4-D"):
        torch.ops.gross.relayout(torch.randn(3, 4), True)


def test_to_memory_format_falls_back_for_strided_and_non_4d_inputs():
    gen = torch.Generator().manual_seed(3)
    sliced = torch.randn(2, 8, 6, 6, generator=gen)[:, ::2]   # dense in neither layout
    flipped = torch.randn(3, 5, generator=gen).t()
    complex_ = torch.randn(2, 3, 4, 5, dtype=torch.complex64, generator=gen)
    for t, fmt in [(sliced, torch.channels_last), (sliced, torch.contiguous_format),
                   (flipped, torch.contiguous_format), (complex_, torch.channels_last),
                   (complex_.conj(), torch.channels_last)]:
        out = _layout.to_memory_format(t, fmt)
        assert out.is_contiguous(memory_format=fmt) and torch.equal(out, t)
    same = torch.randn(2, 3, 4, 4, generator=gen)
    assert _layout.to_memory_format(same, torch.contiguous_format) is same


def test_relayout_opcheck():
    x = torch.randn(2, 5, 3, 7)
    torch.library.opcheck(torch.ops.gross.relayout.default, (x, True))
    torch.library.opcheck(torch.ops.gross.relayout.default,
                          (x.contiguous(memory_format=torch.channels_last), False))
