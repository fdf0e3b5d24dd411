"""`auto`'s decisions on disk: one JSON file, keyed by the software versions, then by signature.

The file is `dispatch.json` in `$GROSS_KERNELS_CACHE` (a folder), else in
`$XDG_CACHE_HOME/gross_kernels` or `~/.cache/gross_kernels`; `GROSS_KERNELS_CACHE=off` keeps
decisions in memory only. Signatures carry the device's name; the top-level key names the versions
of torch, triton, CUDA and this package (with a digest of its code), so a new version decides afresh. Several processes may
share the file: each store re-reads it under a lock and replaces it atomically. A damaged file is
ignored with a warning and rewritten by the next store.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import warnings
from importlib import metadata

import torch

from ..files import atomic_write_json, locked
from ._autotune import Decision

FORMAT = 1
_LOADED = {}  # path -> {environment: {signature key: record}} as read at first use


def path():
    """The cache file, or None when caching on disk is off."""
    folder = os.environ.get("GROSS_KERNELS_CACHE", "").strip()
    if folder.lower() == "off":
        return None
    if not folder:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        folder = os.path.join(base, "gross_kernels")
    return os.path.join(folder, "dispatch.json")


@functools.lru_cache(maxsize=None)
def _triton_version() -> str:
    try:
        return metadata.version("triton")
    except metadata.PackageNotFoundError:
        return "none"


@functools.lru_cache(maxsize=None)
def _package_version() -> str:
    try:
        return metadata.version("gross-kernels")
    except metadata.PackageNotFoundError:
        return "source"


@functools.lru_cache(maxsize=None)
def _code_digest() -> str:
    """A digest of this package's Python sources and compiled extension: an editable install
    keeps its version number while its kernels change."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    digest = hashlib.sha256()
    for folder, _, files in sorted(os.walk(root)):
        for name in sorted(f for f in files if f.endswith((".py", ".so", ".pyd"))):
            with open(os.path.join(folder, name), "rb") as f:
                digest.update(name.encode() + f.read())
    return digest.hexdigest()[:12]


def environment() -> str:
    """The versions a decision holds for."""
    return (f"torch {torch.__version__} | triton {_triton_version()} | cuda {torch.version.cuda} "
            f"| gross_kernels {_package_version()} ({_code_digest()})")


def _read(file) -> dict:
    """The file's entries ({} when it is missing; {} and a warning when it is damaged)."""
    try:
        with open(file) as f:
            content = json.load(f)
        if not isinstance(content, dict) or content.get("format") != FORMAT or not isinstance(
                content.get("environments"), dict):
            raise ValueError(f"not a format-{FORMAT} gross_kernels dispatch cache")
        return content["environments"]
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as error:
        warnings.warn(f"gross_kernels: dispatch cache {file} is damaged ({error}); it is ignored "
                      f"and will be rewritten", RuntimeWarning, stacklevel=3)
        return {}


def _entries(file) -> dict:
    if file not in _LOADED:
        _LOADED[file] = _read(file)
    return _LOADED[file]


def lookup(sig):
    """The stored decision for `sig` under this environment (source "cache"), or None."""
    file = path()
    if file is None:
        return None
    record = _entries(file).get(environment(), {}).get(sig.key())
    try:
        return Decision.from_json(record, "cache") if record else None
    except (KeyError, TypeError):
        return None


def store(sig, decision) -> None:
    """Add `decision` for `sig` to the file, keeping what other processes stored meanwhile."""
    file = path()
    if file is None:
        return
    record = decision.to_json()
    record.pop("source", None)
    try:
        with locked(file):
            entries = _read(file)
            entries.setdefault(environment(), {})[sig.key()] = record
            atomic_write_json(file, {"format": FORMAT, "environments": entries})
    except OSError as error:  # a read-only home must not stop training
        warnings.warn(f"gross_kernels: could not write the dispatch cache {file} ({error})",
                      RuntimeWarning, stacklevel=3)
        return
    _LOADED[file] = entries


def forget() -> None:
    """Drop what was read from disk (the next lookup reads the file again)."""
    _LOADED.clear()
