"""GroSS pipeline: decompose a trained CNN into group-size series, train, search, fine-tune, export."""
import importlib

# Top-level names re-exported lazily from the module that owns them, so importing `gross`
# stays cheap and one missing optional dependency does not break unrelated commands.
_EXPORTS = {
    "convert": "gross.decompose",
    "set_config": "gross.config",
    "get_config": "gross.config",
    "series_layers": "gross.config",
    "count_macs": "gross.macs",
}
_SUBMODULES = {"models", "data", "decompose", "config", "macs", "checkpoint", "train", "search",
               "latency", "export", "cli", "settings", "spec", "experiment", "stages", "report", "reproduce"}

__all__ = sorted(set(_EXPORTS) | _SUBMODULES)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    if name in _SUBMODULES:
        return importlib.import_module(f"gross.{name}")
    raise AttributeError(f"module 'gross' has no attribute {name!r}")
