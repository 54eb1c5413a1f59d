"""Atomic, layout-independent checkpoints in ``RUN_DIR/checkpoints/step_NNNNNNN``.

The engine (:class:`workers.parallel.engine.ParallelEngine`) writes a consolidated checkpoint
(full model and AdamW tensors under the model's own parameter names, see
:mod:`workers.parallel.reshard`) into ``step_NNNNNNN/consolidated``, so a checkpoint saved under
one ``(dp, tp, pp)`` layout loads under any other. Every rank writes its share into
``.tmp-step_NNNNNNN``; after a barrier, rank 0
writes ``meta.json`` (step, layout, world size) and renames the folder to its final name, so a
folder without the ``.tmp-`` prefix is always complete. A run killed mid-save leaves only a
``.tmp-`` folder, which the next save or resume removes. Rank 0 then keeps the newest
``checkpoint.keep`` folders.

The run folder must be visible to every worker (a local disk for one machine; a shared
filesystem such as NFS or a Kubernetes volume for a cluster).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

_STEP_DIR = re.compile(r"^step_(\d{7})$")
TAG = "consolidated"


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
        if match and (child / "meta.json").is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def latest_checkpoint(run_dir: str | os.PathLike) -> tuple[int, Path] | None:
    """The newest complete checkpoint, or ``None``."""
    found = complete_checkpoints(run_dir)
    return found[-1] if found else None


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
    meta = json.loads((path / "meta.json").read_text())
    load_path, _ = engine.load_checkpoint(str(path), tag=meta.get("tag", TAG))
    if load_path is None:
        raise RuntimeError(f"could not load checkpoint {path}")
    return meta


def _write_json_atomic(path: Path, payload: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as fh:
        json.dump(payload, fh, indent=2)
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
