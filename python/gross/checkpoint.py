"""Checkpoints and model files: atomic save (temp file + fsync + rename), verified load (format, SHA-256, signature).

A model file is `save_weights` of a model with a `ModelRecord` as its meta: how to rebuild the
architecture (source string, builder keyword arguments, class count, series spec) and its active
configuration, so any stage reloads it (`gross.models.load`).
"""
import dataclasses
import hashlib
import io
import json
import os

import torch

from gross_kernels.files import atomic_write

FORMAT_VERSION = 1
_MAGIC = b"GROSS-CKPT"


class CheckpointError(ValueError):
    """A checkpoint file is missing, corrupt, of another format, or does not match what is being loaded."""


def model_signature(model):
    """JSON-able description of a model's architecture: class and every state-dict entry's name, shape, dtype."""
    # Non-tensor entries (a module's extra state, e.g. a SeriesConv2d's active size) count by type only:
    # the architecture is fixed by the tensors' shapes, not by which configuration is active.
    entries = [[k, list(v.shape), str(v.dtype)] if isinstance(v, torch.Tensor) else [k, type(v).__name__]
               for k, v in model.state_dict().items()]
    digest = hashlib.sha256(json.dumps(entries).encode()).hexdigest()
    return {"class": type(model).__name__, "state": digest}


def save(path, payload, signature=None):
    """Write `payload` (a dict torch.save can store) to `path` atomically; an existing file is replaced only on success.

    `signature` (JSON-able dict, e.g. model_signature plus a recipe) is stored and checked by load().
    """
    if not isinstance(payload, dict):
        raise TypeError(f"payload must be a dict, got {type(payload).__name__}")
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    body = buffer.getvalue()
    header = json.dumps({"format": FORMAT_VERSION, "sha256": hashlib.sha256(body).hexdigest(),
                         "size": len(body), "signature": signature}, sort_keys=True).encode()
    atomic_write(path, _MAGIC + b"\n" + header + b"\n" + body)


def is_gross_file(path):
    """True when `path` starts with this module's checkpoint magic."""
    with open(path, "rb") as f:
        return f.read(len(_MAGIC) + 1) == _MAGIC + b"\n"


def read_header(path):
    """The header of a checkpoint (format, sha256, size, signature) without reading the payload."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist")
    with open(path, "rb") as f:
        if f.readline() != _MAGIC + b"\n":
            raise CheckpointError(f"{path!r} is not a gross checkpoint (bad magic line)")
        try:
            header = json.loads(f.readline())
        except ValueError as err:
            raise CheckpointError(f"{path!r} has a corrupt header") from err
    if not isinstance(header, dict) or header.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{path!r} has format {header.get('format') if isinstance(header, dict) else None!r}; "
                              f"this version reads format {FORMAT_VERSION}")
    return header


def _signature_diff(stored, expected):
    stored = stored or {}
    return {k: (stored.get(k), v) for k, v in expected.items() if stored.get(k) != v}


def load(path, signature=None, map_location="cpu"):
    """Read and verify a checkpoint; returns its payload.

    Raises CheckpointError if the file is missing, truncated, altered (SHA-256 mismatch), of another
    format, or if any key of `signature` differs from the stored signature.
    """
    header = read_header(path)
    with open(path, "rb") as f:
        f.readline()
        f.readline()
        body = f.read()
    if len(body) != header["size"] or hashlib.sha256(body).hexdigest() != header["sha256"]:
        raise CheckpointError(f"checkpoint {os.fspath(path)!r} is corrupt: payload size or SHA-256 does not match")
    if signature is not None:
        diff = _signature_diff(header["signature"], signature)
        if diff:
            details = "; ".join(f"{k}: file has {a!r}, expected {b!r}" for k, (a, b) in diff.items())
            raise CheckpointError(f"checkpoint {os.fspath(path)!r} does not match: {details}")
    return torch.load(io.BytesIO(body), map_location=map_location, weights_only=True)


def save_weights(path, model, meta=None):
    """Save a model's state dict (atomically) with its signature and optional JSON-able `meta` (e.g. name, spec)."""
    save(path, {"model": model.state_dict(), "meta": meta}, {"model": model_signature(model), "meta": meta})


def load_weights(path, model):
    """Load weights saved by save_weights into `model`, refusing files of another architecture; returns meta."""
    payload = load(path, {"model": model_signature(model)})
    model.load_state_dict(payload["model"])
    return payload["meta"]


@dataclasses.dataclass(frozen=True)
class ModelRecord:
    """What a model file records besides the weights: enough to rebuild the architecture, plus results."""

    model: str                  # the source string (gross.models.parse_source)
    num_classes: int = None
    kwargs: dict = dataclasses.field(default_factory=dict)   # the builder's keyword arguments
    spec: dict = None           # the series spec the model was converted with (None: not converted)
    config: dict = None         # its active configuration
    metrics: dict = None        # e.g. val_acc, test_acc

    def to_json(self):
        """JSON-able form, stored in the file's header."""
        return json.loads(json.dumps(dataclasses.asdict(self)))


def save_model(path, model, record):
    """Write a model file: `model`'s weights (atomically) with its `ModelRecord`."""
    if not isinstance(record, ModelRecord):
        raise TypeError(f"record must be a gross.checkpoint.ModelRecord, got {type(record).__name__}")
    save_weights(path, model, record.to_json())


def read_record(path):
    """The `ModelRecord` of a model file, without loading its weights."""
    meta = (read_header(path).get("signature") or {}).get("meta")
    if not isinstance(meta, dict) or "model" not in meta:
        raise CheckpointError(f"{os.fspath(path)!r} is not a gross model file (it records no model); "
                              f"it was not written by save_model")
    # Files from before `kwargs` existed lack it; other absent or null fields take their defaults.
    fields = {f.name for f in dataclasses.fields(ModelRecord)}
    return ModelRecord(**{k: v for k, v in meta.items() if k in fields and v is not None})
