"""Output folders written whole or not at all (exports, compressed models).

No library does this for folders (``tempfile`` gives the private scratch folder, ``os.replace``
the atomic rename): the folder is filled under a temporary name beside its destination, its
files are fsynced, and it is renamed onto the destination only when complete, so a reader never
sees half of it. An existing destination *folder* is replaced only when asked; an existing
*file* never is.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class OutDirError(ValueError):
    """The destination cannot be used (exists, is a file, or its parent is not writable); the
    message names ``--out``, the path and the fix."""


def check_out_dir(out: Path, overwrite: bool) -> None:
    """Refuse a destination before any work.

    Raises:
        OutDirError: ``out`` is an existing file, or an existing folder while ``overwrite`` is
            false.
    """
    if out.exists() and not out.is_dir():
        raise OutDirError(f"--out {out} is a file, not a folder; choose a folder path")
    if out.exists() and not overwrite:
        raise OutDirError(f"--out {out} already exists; choose another folder or pass --overwrite")


@contextmanager
def staged_dir(out: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``out``; on a clean exit it becomes ``out``.

    Files are made readable as the umask allows (``mkdtemp`` creates a private 0700 folder) and
    fsynced before the rename. On any exception the temporary folder is removed and ``out`` is
    left as it was.

    Raises:
        OutDirError: see :func:`check_out_dir`, or the parent folder cannot be created or
            written.
    """
    out = Path(out)
    check_out_dir(out, overwrite)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{out.name}-", dir=out.parent))
    except OSError as exc:
        raise OutDirError(
            f"--out {out}: cannot create a folder in {out.parent} ({exc.strerror}); choose a "
            "writable location"
        ) from None
    umask = _umask()
    try:
        yield tmp
        tmp.chmod(0o777 & ~umask)
        for f in tmp.rglob("*"):
            if f.is_file():
                f.chmod(0o666 & ~umask)
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        _replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _replace(tmp: Path, out: Path) -> None:
    """Rename ``tmp`` to ``out``; an existing folder ``out`` is moved aside first, then removed."""
    if not out.exists():
        os.replace(tmp, out)
        return
    old = out.with_name(f".old-{out.name}-{os.getpid()}")
    os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
