"""Bad input to the public ops and the layer: one table, each row names the argument and the rule."""
import pytest
import torch

import gross_kernels as gk


def _series_call(**changes):
    """A valid series call (S=8, T=8, sizes 1,2,4), with some arguments replaced."""
    args = dict(x=torch.randn(2, 8, 6, 6), cores=[torch.randn(8, g, 3, 3) for g in (1, 2, 4)],
                group_sizes=(1, 2, 4), group_size=2, stride=1, padding=1, dilation=1,
                backend="reference")
    args.update(changes)
    return lambda: gk.series_grouped_conv2d(**args)


def _bottleneck_call(**changes):
    """A valid bottleneck call (C_in=3, S=4, T=8, C_out=5, sizes 1,2), with replacements."""
    args = dict(x=torch.randn(2, 3, 6, 6), firsts=[torch.randn(4, 3, 1, 1) for _ in range(2)],
                cores=[torch.randn(8, g, 3, 3) for g in (1, 2)],
                lasts=[torch.randn(5, 8, 1, 1) for _ in range(2)], bias=torch.randn(5),
                group_sizes=(1, 2), group_size=2, stride=1, padding=1, dilation=1,
                backend="reference")
    args.update(changes)
    return lambda: gk.series_bottleneck_conv2d(**args)


def _layer(**changes):
    args = dict(in_channels=8, out_channels=8, kernel_size=3, group_sizes=(1, 2, 4))
    args.update(changes)
    return lambda: gk.SeriesConv2d(**args)


def _set_group_size(value):
    def call():
        layer = gk.SeriesConv2d(8, 8, 3, (1, 2, 4))
        layer.group_size = value
    return call


cores_124 = [torch.randn(8, g, 3, 3) for g in (1, 2, 4)]

BAD_INPUT = [
    # (id, call, exception, words the message must contain)
    ("x not a tensor", _series_call(x=[[1.0]]), TypeError, "x must be a torch.Tensor"),
    ("x not 4-D", _series_call(x=torch.randn(8, 6, 6)), ValueError, "x must be 4-D"),
    ("x integer dtype", _series_call(x=torch.ones(2, 8, 6, 6, dtype=torch.int64)), TypeError,
     "floating dtype"),
    ("x channels (S) invalid for cores", _series_call(x=torch.randn(2, 12, 6, 6)), ValueError,
     "S//1=12 does not"),
    ("bottleneck x channels != C_in", _bottleneck_call(x=torch.randn(2, 4, 6, 6)), ValueError,
     "firsts[0] must have shape (S, C_in, 1, 1) = (4, 4, 1, 1)"),
    ("cores empty", _series_call(cores=[]), TypeError, "cores must be a non-empty list"),
    ("cores a tensor", _series_call(cores=torch.randn(8, 1, 3, 3)), TypeError, "cores must be"),
    ("too few cores", _series_call(cores=cores_124[:2]), ValueError, "one tensor per group size"),
    ("core wrong shape", _series_call(cores=[cores_124[0], torch.randn(8, 3, 3, 3), cores_124[2]]),
     ValueError, "cores[1] must have shape"),
    ("core kernel mismatch", _series_call(cores=[cores_124[0], torch.randn(8, 2, 5, 5), cores_124[2]]),
     ValueError, "cores[1] must have shape"),
    ("core dtype mismatch", _series_call(cores=[c.double() for c in cores_124]), TypeError,
     "dtype"),
    ("group sizes not increasing", _series_call(group_sizes=(2, 1, 4),
                                                cores=[torch.randn(8, g, 3, 3) for g in (2, 1, 4)]),
     ValueError, "strictly increasing"),
    ("group sizes not nested", _series_call(
        x=torch.randn(2, 12, 6, 6), group_sizes=(2, 3), group_size=3,
        cores=[torch.randn(12, g, 3, 3) for g in (2, 3)]), ValueError, "nested"),
    ("group size not dividing S", _series_call(
        x=torch.randn(2, 6, 6, 6), group_sizes=(4,), group_size=4,
        cores=[torch.randn(12, 4, 3, 3)]), ValueError, "must divide the bottleneck S"),
    ("S//g not dividing T", _series_call(cores=[torch.randn(6, g, 3, 3) for g in (1, 2, 4)]),
     ValueError, "must divide T"),
    ("group sizes not ints", _series_call(group_sizes=(1.0, 2, 4)), TypeError, "must hold ints"),
    ("group sizes a string", _series_call(group_sizes="124"), TypeError, "sequence of ints"),
    ("group size zero", _series_call(group_sizes=(0, 2, 4)), ValueError, "positive"),
    ("group_size not in series", _series_call(group_size=8), ValueError,
     "group_size must be one of group_sizes"),
    ("group_size a float", _series_call(group_size=2.0), TypeError, "group_size must be an int"),
    ("stride zero", _series_call(stride=0), ValueError, "stride must be positive"),
    ("stride negative pair", _series_call(stride=(1, -1)), ValueError, "stride must be positive"),
    ("padding negative", _series_call(padding=-1), ValueError, "padding must be non-negative"),
    ("dilation zero", _series_call(dilation=0), ValueError, "dilation must be positive"),
    ("stride of three", _series_call(stride=(1, 1, 1)), TypeError, "stride must be an int or a pair"),
    ("input smaller than kernel", _series_call(x=torch.randn(2, 8, 2, 2), padding=0), ValueError,
     "smaller than the dilated kernel"),
    ("unknown backend", _series_call(backend="fast"), ValueError, "backend must be one of"),
    ("backend not a string", _series_call(backend=None), TypeError, "backend must be a str"),
    ("bottleneck first wrong shape", _bottleneck_call(firsts=[torch.randn(4, 2, 1, 1)] * 2),
     ValueError, "firsts[0] must have shape"),
    ("bottleneck last wrong shape", _bottleneck_call(lasts=[torch.randn(5, 8, 1, 1),
                                                            torch.randn(5, 7, 1, 1)]),
     ValueError, "lasts[1] must have shape"),
    ("bottleneck bias wrong shape", _bottleneck_call(bias=torch.randn(4)), ValueError,
     "bias must have shape"),
    ("bottleneck too few lasts", _bottleneck_call(lasts=[torch.randn(5, 8, 1, 1)]), ValueError,
     "lasts must hold one tensor per group size"),
    ("bottleneck bias dtype", _bottleneck_call(bias=torch.randn(5, dtype=torch.float64)),
     TypeError, "bias dtype"),
    ("layer bottleneck invalid for series", _layer(bottleneck=(8, 6)), ValueError, "must divide T"),
    ("layer negative channels", _layer(in_channels=-8), ValueError, "in_channels must be a positive int"),
    ("layer bad bottleneck type", _layer(bottleneck="wide"), TypeError, "bottleneck must be"),
    ("layer kernel size zero", _layer(kernel_size=0), ValueError, "kernel_size must be positive"),
    ("layer unknown backend", _layer(backend="gpu"), ValueError, "backend must be one of"),
    ("layer group_size not in series", _set_group_size(3), ValueError,
     "group_size must be one of group_sizes"),
]


@pytest.mark.parametrize("call, error, words", [row[1:] for row in BAD_INPUT],
                         ids=[row[0] for row in BAD_INPUT])
def test_bad_input_raises_clear_error(call, error, words):
    with pytest.raises(error) as info:
        call()
    assert words in str(info.value)


def test_bad_input_table_is_large():
    assert len(BAD_INPUT) >= 20
