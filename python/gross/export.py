"""Export one configuration of a series model as plain PyTorch, a torch.export program or ONNX."""
import copy
import io
import os
import tempfile

import torch

from gross_kernels.files import atomic_write

from gross.config import series_layers, set_config
from gross.decompose.model import replace_module


def to_plain(model, config=None):
    """A copy of `model` at `config` where every SeriesConv2d is its `export()` (three nn.Conv2d).

    The copy computes the same function as `model` at that configuration and needs only
    torch (no gross_kernels op) to run; `model` itself is left untouched.
    """
    plain = copy.deepcopy(model)
    if config is not None:
        set_config(plain, config)
    for name, layer in series_layers(plain).items():
        replace_module(plain, name, layer.export())
    return plain


def save(module, path):
    """`torch.save` the whole module to `path` atomically (a crash leaves the old file or none)."""
    buffer = io.BytesIO()
    torch.save(module, buffer)
    return atomic_write(path, buffer.getvalue())


def load(path, map_location="cpu"):
    """Load a module written by `save` (a full pickled module, so only from trusted files)."""
    return torch.load(path, map_location=map_location, weights_only=False)


def export_program(module, example_input, dynamic_batch=True):
    """`torch.export.export` of `module` in eval mode; with `dynamic_batch` any batch size runs it."""
    if dynamic_batch and example_input.shape[0] < 2:
        # A batch of one would be specialised to exactly one: trace with two instead.
        example_input = example_input.expand(2, *example_input.shape[1:]).contiguous()
    shapes = ({0: torch.export.Dim("batch")},) if dynamic_batch else None
    return torch.export.export(module.eval(), (example_input,), dynamic_shapes=shapes)


def save_program(program, path):
    """`torch.export.save` an exported program to `path` atomically."""
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    return atomic_write(path, buffer.getvalue())


def export_onnx(module, example_input, path):
    """ONNX file of `module` in eval mode (needs the `onnx` and `onnxscript` packages)."""
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as err:
        raise RuntimeError(f"ONNX export needs the onnx and onnxscript packages ({err}); "
                           f"pip install onnx onnxscript") from err
    # The exporter writes to a path: write a scratch copy, then replace `path` atomically.
    with tempfile.TemporaryDirectory() as scratch:
        tmp = os.path.join(scratch, "model.onnx")
        torch.onnx.export(module.eval(), (example_input,), tmp, external_data=False)
        with open(tmp, "rb") as f:
            return atomic_write(path, f.read())
