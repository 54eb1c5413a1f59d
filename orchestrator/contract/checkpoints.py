"""Where checkpoints live and which are complete: the folder rule both sides read.

``RUN_DIR/checkpoints/step_NNNNNNN`` holds one complete checkpoint (its ``meta.json`` is written
last, then the folder is renamed from ``.tmp-step_NNNNNNN``; see :mod:`workers.checkpoint`).
The driver reads this to refuse impossible resumes before launch and to summarise a run; the
workers read it to resume. Pure Python.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from orchestrator.contract.layout import Layout

_STEP_DIR = re.compile(r"^step_(\d{7})$")
#: The sub-folder (DeepSpeed "tag") inside a checkpoint folder.
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


def read_meta(path: Path) -> dict:
    """The ``meta.json`` of a complete checkpoint folder (step, tag, layout, world size, model)."""
    return json.loads((path / "meta.json").read_text())


def saved_layout(path: Path) -> Layout | None:
    """The layout a checkpoint folder was written under (``None`` for checkpoints without one)."""
    layout = read_meta(path).get("layout")
    return Layout(**layout) if layout else None
