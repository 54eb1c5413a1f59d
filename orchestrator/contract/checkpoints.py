"""Where checkpoints live and which are complete: the folder rule both sides read.

``RUN_DIR/checkpoints/step_NNNNNNN`` holds one checkpoint; its ``manifest.json`` (every file's
relative path, size in bytes and SHA-256) is written last, then the folder is renamed from
``.tmp-step_NNNNNNN`` (see :mod:`workers.checkpoint`). A checkpoint proves it is complete by
its manifest: :func:`verify_checkpoint` re-checks every size and checksum, and
:func:`find_resumable` takes the newest checkpoint that passes, listing the newer ones it
rejected and why (a zero-byte file after a crash or a full disk, a missing manifest).
The driver reads this to refuse impossible resumes before launch and to summarise a run; the
workers read it to resume. Pure Python.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

from orchestrator.contract.layout import Layout

_STEP_DIR = re.compile(r"^step_(\d{7})$")
_TMP_DIR = re.compile(r"^\.tmp-step_\d+$")
#: The sub-folder (DeepSpeed "tag") inside a checkpoint folder.
TAG = "consolidated"
#: ``RUN_DIR/failure.json``: written by rank 0 when the divergence guard stops a run (the workers
#: then end normally, so Ray Train does not retry a deterministic failure); the driver fails the job.
FAILURE_FILE = "failure.json"
#: Written last into a checkpoint folder: it lists every other file with its size and SHA-256.
MANIFEST = "manifest.json"


def checkpoint_root(run_dir: str | os.PathLike) -> Path:
    """``RUN_DIR/checkpoints``."""
    return Path(run_dir) / "checkpoints"


def complete_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """``(step, path)`` of complete checkpoints, oldest first."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and (child / MANIFEST).is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def latest_checkpoint(run_dir: str | os.PathLike) -> tuple[int, Path] | None:
    """The newest checkpoint that passes :func:`verify_checkpoint`, or ``None``."""
    return find_resumable(run_dir)[0]


def find_resumable(
    run_dir: str | os.PathLike,
) -> tuple[tuple[int, Path] | None, list[tuple[Path, str]]]:
    """The newest verified checkpoint and the newer ones rejected on the way, with the reason.

    Returns:
        ``((step, path) or None, [(rejected_path, reason), ...])``, rejected newest first.
    """
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return None, []
    candidates = sorted(
        ((int(m.group(1)), c) for c in root.iterdir() if (m := _STEP_DIR.match(c.name))),
        reverse=True,
    )
    rejected: list[tuple[Path, str]] = []
    for step, path in candidates:
        reason = verify_checkpoint(path)
        if reason is None:
            return (step, path), rejected
        rejected.append((path, reason))
    return None, rejected


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def build_manifest(folder: Path) -> dict:
    """``{"files": {relative_path: {"bytes": n, "sha256": hex}}}`` of every file under ``folder``
    (except the manifest itself)."""
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST):
        files[path.relative_to(folder).as_posix()] = {
            "bytes": path.stat().st_size,
            "sha256": file_sha256(path),
        }
    return {"version": 1, "files": files}


def verify_checkpoint(folder: Path) -> str | None:
    """Why ``folder`` is not a complete checkpoint, or ``None`` if its manifest holds.

    Checks that ``manifest.json`` parses, lists ``meta.json``, and that every listed file exists
    with the listed size and SHA-256; ``meta.json`` must parse too.
    """
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        files = manifest["files"]
    except FileNotFoundError:
        return "no manifest.json (the save did not finish, or an older mla-train wrote it)"
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"unreadable manifest.json ({type(exc).__name__}: {exc})"
    if not isinstance(files, dict) or "meta.json" not in files:
        return "manifest.json does not list meta.json"
    for rel, entry in files.items():
        path = folder / rel
        try:
            size = path.stat().st_size
        except OSError:
            return f"{rel} is missing"
        if size != entry.get("bytes"):
            return f"{rel} has {size} bytes, the manifest says {entry.get('bytes')}"
        if file_sha256(path) != entry.get("sha256"):
            return f"{rel} does not match its SHA-256 checksum"
    try:
        json.loads((folder / "meta.json").read_text())
    except ValueError as exc:
        return f"meta.json is not valid JSON ({exc})"
    return None


def set_aside(path: Path) -> Path:
    """Rename a rejected checkpoint to ``rejected-step_NNNNNNN`` (kept for inspection, out of the
    way of resume and retention); returns the new path."""
    target = path.with_name(f"rejected-{path.name}")
    shutil.rmtree(target, ignore_errors=True)
    os.replace(path, target)
    return target


def remove_stale_temporaries(run_dir: str | os.PathLike) -> list[Path]:
    """Remove every ``.tmp-step_*`` folder (left by a save that was killed); returns them."""
    root = checkpoint_root(run_dir)
    stale = [c for c in root.iterdir() if _TMP_DIR.match(c.name)] if root.is_dir() else []
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


def read_meta(path: Path) -> dict:
    """The ``meta.json`` of a complete checkpoint folder (step, tag, layout, world size, model)."""
    return json.loads((path / "meta.json").read_text())


def saved_layout(path: Path) -> Layout | None:
    """The layout a checkpoint folder was written under (``None`` for checkpoints without one)."""
    layout = read_meta(path).get("layout")
    return Layout(**layout) if layout else None
