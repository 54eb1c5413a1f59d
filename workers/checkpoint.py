"""Atomic, layout-independent checkpoints in ``RUN_DIR/checkpoints/step_NNNNNNN``.

The engine (:class:`workers.parallel.engine.ParallelEngine`) writes a consolidated checkpoint
(full model and AdamW tensors under the model's own parameter names, see
:mod:`workers.parallel.reshard`) into ``step_NNNNNNN/consolidated``, so a checkpoint saved under
one ``(dp, tp, pp)`` layout loads under any other. Every rank writes its share into
``.tmp-step_NNNNNNN``; after a barrier, rank 0
writes ``meta.json`` (step, layout, world size), then -- last, atomically -- ``manifest.json``
(every file's relative path, size in bytes and SHA-256), and renames the folder to its final name.
A checkpoint proves it is complete by its manifest: :func:`verify_checkpoint` re-checks every
size and checksum, and :func:`find_resumable` takes the newest checkpoint that passes, listing
the newer ones it rejected and why (a zero-byte file after a crash or a full disk, a missing
manifest); the workers rename those to ``rejected-step_NNNNNNN``. A run killed mid-save leaves
only a ``.tmp-`` folder, which the next save or resume
removes (:func:`remove_stale_temporaries`). Rank 0 then keeps the newest ``checkpoint.keep``
folders.

The run folder must be visible to every worker (a local disk for one machine; a shared
filesystem such as NFS or a Kubernetes volume for a cluster).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

_STEP_DIR = re.compile(r"^step_(\d{7})$")
_TMP_DIR = re.compile(r"^\.tmp-step_\d+$")
TAG = "consolidated"
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


def find_resumable(run_dir: str | os.PathLike) -> tuple[tuple[int, Path] | None, list[tuple[Path, str]]]:
    """The newest verified checkpoint and the newer ones rejected on the way, with the reason.

    Returns:
        ``((step, path) or None, [(rejected_path, reason), ...])``, rejected newest first.
    """
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return None, []
    candidates = sorted(((int(m.group(1)), c) for c in root.iterdir() if (m := _STEP_DIR.match(c.name))),
                        reverse=True)
    rejected = []
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
        files[path.relative_to(folder).as_posix()] = {"bytes": path.stat().st_size, "sha256": file_sha256(path)}
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


def save_checkpoint(engine, run_dir: str | os.PathLike, step: int, meta: dict, rank: int, keep: int,
                    barrier) -> Path:
    """Save ``engine`` (a DeepSpeed engine) atomically as the checkpoint of ``step``.

    Args:
        engine: Anything with DeepSpeed's ``save_checkpoint(path, tag=, client_state=,
            save_latest=)``: the :class:`~workers.parallel.engine.ParallelEngine` adapter.
        run_dir: RUN_DIR shared by all ranks.
        step: Optimizer steps completed.
        meta: Extra JSON-serialisable facts (layout, world size, data position).
        rank: This process's global rank.
        keep: Complete checkpoints to keep (older ones are deleted by rank 0).
        barrier: Callable that blocks until every rank reaches it.

    Returns:
        The final folder of this checkpoint.
    """
    root = checkpoint_root(run_dir)
    final = root / f"step_{step:07d}"
    tmp = root / f".tmp-step_{step:07d}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    barrier()
    engine.save_checkpoint(str(tmp), tag=TAG, client_state={"step": step}, save_latest=False)
    barrier()
    if rank == 0:
        _write_json_atomic(tmp / "meta.json", {"step": step, "tag": TAG, **meta})
        _write_json_atomic(tmp / MANIFEST, build_manifest(tmp))  # last: it proves the rest is complete
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _fsync_dir(root)
        for _, old in complete_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def load_checkpoint(engine, path: Path) -> dict:
    """Load model, optimizer and LR-scheduler state from a complete checkpoint folder (written
    under any layout).

    Returns:
        The checkpoint's ``meta.json`` content.

    Raises:
        RuntimeError: the checkpoint could not be loaded (e.g. another model shape).
    """
    try:
        meta = json.loads((path / "meta.json").read_text())
        load_path, _ = engine.load_checkpoint(str(path), tag=meta.get("tag", TAG))
    except (OSError, ValueError, EOFError, KeyError, RuntimeError) as exc:
        raise RuntimeError(f"could not load checkpoint {path}: {type(exc).__name__}: {exc}; move it aside "
                           "to resume from an older one, or set checkpoint.resume=false") from None
    if load_path is None:
        raise RuntimeError(f"could not load checkpoint {path}")
    return meta


def _write_json_atomic(path: Path, payload: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    from workers.strict_json import finite_or_none

    with open(tmp, "w") as fh:
        json.dump(finite_or_none(payload), fh, indent=2, allow_nan=False)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def write_json_atomic(path: str | os.PathLike, payload: dict) -> None:
    """Write ``payload`` as JSON to ``path`` through a temporary file and an atomic rename."""
    _write_json_atomic(Path(path), payload)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
