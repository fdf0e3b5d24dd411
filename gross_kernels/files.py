"""Durable file writes shared by the kernels' dispatch cache and the `gross` pipeline.

`atomic_write` replaces a file only once the new content is complete and on disk (temp file in
the same folder, fsync, rename, fsync of the folder), so a crash leaves the old file or the new
one, never a torn one. `locked` serialises read-modify-write cycles of several processes on one
file (an advisory `flock` on a sibling lock file).
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile


def _fsync_dir(directory: str) -> None:
    # The rename itself lives in the folder's entry: persist it where the platform allows.
    if hasattr(os, "O_DIRECTORY"):
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path, data) -> str:
    """Write `data` (bytes or str) to `path` atomically and durably; returns the path."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    body = data.encode() if isinstance(data, str) else bytes(data)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(body)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(directory)
    return path


def atomic_write_json(path, obj, indent=1) -> str:
    """`atomic_write` of `obj` as JSON."""
    return atomic_write(path, json.dumps(obj, indent=indent) + "\n")


@contextlib.contextmanager
def locked(path):
    """Hold an exclusive advisory lock tied to `path` (on `path + '.lock'`) for the block."""
    import fcntl

    lock_path = os.fspath(path) + ".lock"
    os.makedirs(os.path.dirname(os.path.abspath(lock_path)), exist_ok=True)
    with open(lock_path, "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
