"""GroSS kernels: fused ops for summed series of grouped convolutions, and the SeriesConv2d layer."""
from . import _extension

# Register the compiled gross:: kernel ops (when built) before the Python custom ops use them.
_extension.load()

from .backends import (BackendUnavailableError, available_backends, dispatch_report,  # noqa: E402
                       set_autotune)
from .layer import SeriesConv2d  # noqa: E402
from .ops import series_bottleneck_conv2d, series_grouped_conv2d  # noqa: E402

__all__ = ["series_grouped_conv2d", "series_bottleneck_conv2d", "SeriesConv2d",
           "available_backends", "BackendUnavailableError", "dispatch_report", "set_autotune"]
