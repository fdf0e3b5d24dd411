"""Decomposition: block term decomposition of conv weights, the GroSS series of a conv, model conversion.

Rooms: `_btd` (the PCI / ALS numerical core), `_greedy` (the greedy start), `weight` (`btd` of
one weight), `_parallel` (the worker pool running many BTDs), `layer` (`series` of one conv),
`model` (`convert` of a whole model). Each imports only the rooms before it in that list.
"""
from .layer import series
from .model import convert
from .weight import (GREEDY_MAX_WIDTHS, GREEDY_PASSES, INITS, METHODS, WORK_DTYPES, BTDResult, btd,
                     reconstruct)

# bench/decompose.py times the series' BTD jobs without building a model: it imports these two.
from .layer import _series_jobs, _series_layers  # noqa: E402,F401

__all__ = ["BTDResult", "btd", "reconstruct", "series", "convert", "METHODS", "INITS", "WORK_DTYPES",
           "GREEDY_MAX_WIDTHS", "GREEDY_PASSES"]
