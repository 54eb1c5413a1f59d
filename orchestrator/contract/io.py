"""Atomic file writes: the one helper every writer of run, sweep and checkpoint files uses.

A reader (another process, a resumed run, the user) sees either the old file or the complete new
one, never half of it: the content goes to a temporary file beside the target, is flushed and
fsynced, and replaces the target with ``os.replace`` (atomic on POSIX within one filesystem).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: str | os.PathLike, data: str | bytes) -> None:
    """Write ``data`` (text as UTF-8, or bytes) to ``path`` atomically.

    Example:
        >>> import tempfile; folder = Path(tempfile.mkdtemp())
        >>> atomic_write(folder / "a.txt", "hello"); (folder / "a.txt").read_text()
        'hello'
    """
    payload = data.encode() if isinstance(data, str) else data
    atomic_write_with(path, lambda tmp: tmp.write_bytes(payload))


def atomic_write_with(path: str | os.PathLike, write: Callable[[Path], object]) -> None:
    """Call ``write(tmp_path)`` to produce the file, then move it onto ``path`` atomically.

    For writers that need a path of their own (``matplotlib``'s ``savefig``); the temporary name
    keeps the suffix of ``path`` so that format detection by suffix still works.
    """
    path = Path(path)
    tmp = path.with_name(f".tmp-{path.stem}{path.suffix}")
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json_atomic(path: str | os.PathLike, payload: dict) -> None:
    """Write ``payload`` as indented, strict JSON to ``path`` atomically (non-finite floats
    become ``null``: ``NaN``/``Infinity`` are not JSON, RFC 8259 §6)."""
    from orchestrator.contract.strict_json import finite_or_none

    atomic_write(path, json.dumps(finite_or_none(payload), indent=2, allow_nan=False))


def fsync_dir(path: Path) -> None:
    """Flush a directory entry (after a rename into it); a no-op where directories cannot be
    opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
