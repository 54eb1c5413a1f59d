"""Atomic, layout-independent checkpoints in ``RUN_DIR/checkpoints/step_NNNNNNN``.

The engine (:class:`workers.parallel.engine.ParallelEngine`) writes a consolidated checkpoint
(full model and AdamW tensors under the model's own parameter names, see
:mod:`workers.parallel.reshard`) into ``step_NNNNNNN/consolidated``, so a checkpoint saved under
one ``(dp, tp, pp)`` layout loads under any other. Every rank writes its share into
``.tmp-step_NNNNNNN``; after a barrier, rank 0
writes ``meta.json`` (step, layout, world size), then -- last, atomically -- ``manifest.json``
(every file's size and SHA-256, :func:`orchestrator.contract.checkpoints.build_manifest`), and
renames the folder to its final name. Resume verifies the manifest and falls back to the newest
checkpoint that verifies (:func:`orchestrator.contract.checkpoints.find_resumable`); the workers
rename rejected folders to ``rejected-step_NNNNNNN``. A run killed mid-save leaves only a
``.tmp-`` folder, which the next save or resume removes. Rank 0 then keeps the newest
``checkpoint.keep`` folders.

The run folder must be visible to every worker (a local disk for one machine; a shared
filesystem such as NFS or a Kubernetes volume for a cluster).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from orchestrator.contract.checkpoints import (
    MANIFEST,
    TAG,
    build_manifest,
    checkpoint_root,
    complete_checkpoints,
    read_meta,
)
from orchestrator.contract.io import atomic_write, fsync_dir, write_json_atomic


def save_checkpoint(
    engine,
    run_dir: str | os.PathLike,
    step: int,
    meta: dict,
    rank: int,
    keep: int,
    barrier,
    files: dict[str, str] | None = None,
) -> Path:
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
        files: Extra text files (name -> content) rank 0 writes into the folder before the
            manifest, which then covers them (the run's ``tokenizer.json``).

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
        write_json_atomic(tmp / "meta.json", {"step": step, "tag": TAG, **meta})
        for name, text in (files or {}).items():
            atomic_write(tmp / name, text)
        write_json_atomic(
            tmp / MANIFEST, build_manifest(tmp)
        )  # last: it proves the rest is complete
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        fsync_dir(root)
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
        meta = read_meta(path)
        load_path, _ = engine.load_checkpoint(str(path), tag=meta.get("tag", TAG))
    except (OSError, ValueError, EOFError, KeyError, RuntimeError) as exc:
        raise RuntimeError(
            f"could not load checkpoint {path}: {type(exc).__name__}: {exc}; move it aside "
            "to resume from an older one, or set checkpoint.resume=false"
        ) from None
    if load_path is None:
        raise RuntimeError(f"could not load checkpoint {path}")
    return meta
