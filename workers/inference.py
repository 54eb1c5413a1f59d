"""Load a trained model for inference from a run folder, a checkpoint folder or an export.

One helper for every inference command (``mla generate``, ``mla eval``, ``mla export``, and
later ``--onnx`` variants): :func:`load_model` accepts

* a run folder ``RUN_DIR`` (its newest complete checkpoint is used),
* a checkpoint folder ``RUN_DIR/checkpoints/step_NNNNNNN`` (:mod:`workers.checkpoint`: its
  ``meta.json`` carries the model shape, ``consolidated/`` the full tensors under the model's own
  parameter names, :mod:`workers.parallel.reshard`), or
* an export folder (:mod:`mla.pretrained`).

Incomplete input is refused with :class:`orchestrator.contract.errors.CheckpointError` naming the path
and what is missing: a ``.tmp-`` folder (a save that did not finish), a step folder without
``meta.json``, missing or truncated stage files. Only the model weights are read (not the AdamW
state); no Ray, no DeepSpeed.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mla.config import ModelConfig
from mla.model import MLATransformer
from mla.pretrained import build_model, is_pretrained_dir, load_pretrained
from mla.tokenizer import TOKENIZER_FILE, ByteTokenizer, Tokenizer, tokenizer_from_json
from orchestrator.contract.checkpoints import (
    TAG,
    checkpoint_root,
    find_resumable,
    verify_checkpoint,
)
from orchestrator.contract.errors import CheckpointError

_STEP = re.compile(r"^step_(\d{7})$")


@dataclass
class LoadedModel:
    """A model ready for inference and where it came from.

    Attributes:
        model: The model, in eval mode.
        cfg: Its configuration.
        source: The path given.
        kind: ``"checkpoint"`` or ``"export"``.
        checkpoint: The checkpoint folder (``None`` for an export).
        step: Training step of the checkpoint (``None`` if unknown).
        run_dir: The run folder (``None`` for an export).
        job: The run's ``job.json`` (validated job config as a dict), when present.
        skipped: Newer checkpoints of the run that failed verification, ``"step_N: reason"``
            (the newest verified one was loaded instead).
    """

    model: MLATransformer
    cfg: ModelConfig
    source: Path
    kind: str
    checkpoint: Path | None = None
    step: int | None = None
    run_dir: Path | None = None
    job: dict | None = field(default=None, repr=False)
    skipped: tuple[str, ...] = ()
    tokenizer: Tokenizer = field(default_factory=ByteTokenizer, repr=False)
    """The tokenizer the run trained with (its ``tokenizer.json``; byte when none is stored)."""


def resolve_checkpoint(path: str | Path) -> Path:
    """The complete checkpoint folder that ``path`` (a run folder or a checkpoint) names.

    See :func:`resolve_checkpoint_noting_skips`, of which this is the path.
    """
    return resolve_checkpoint_noting_skips(path)[0]


def resolve_checkpoint_noting_skips(path: str | Path) -> tuple[Path, tuple[str, ...]]:
    """The complete checkpoint folder that ``path`` names, and the newer ones of a run folder
    that failed verification (``"step_N: reason"``), so that callers can say they were passed.

    Raises:
        CheckpointError: ``path`` does not exist, is an unfinished save, or holds no complete
            checkpoint.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise CheckpointError(
            f"{p} does not exist; pass a run folder (runs/NAME), a checkpoint folder "
            "(runs/NAME/checkpoints/step_NNNNNNN) or an export folder"
        )
    if p.is_file():
        raise CheckpointError(
            f"{p} is a file, not a checkpoint; pass the run folder the job wrote (runs/NAME), "
            "a checkpoint folder (runs/NAME/checkpoints/step_NNNNNNN) or an export folder "
            "(mla export --out DIR)"
        )
    if p.name.startswith(".tmp-step_"):
        raise CheckpointError(
            f"{p} is a checkpoint whose save did not finish (a .tmp- folder); use a "
            "complete step_NNNNNNN folder or the run folder"
        )
    if _STEP.match(p.name):
        reason = verify_checkpoint(p)
        if reason is not None:
            raise CheckpointError(
                f"{p} is not a complete checkpoint ({reason}); use another checkpoint "
                "or the run folder"
            )
        return p, ()
    found, rejected = find_resumable(p)
    if found is not None:
        return found[1], tuple(f"{path.name}: {why}" for path, why in rejected)
    root = checkpoint_root(p)
    others = (
        sorted(c.name for c in root.iterdir() if not _STEP.match(c.name)) if root.is_dir() else []
    )
    seen = [f"{path.name}: {why}" for path, why in rejected] + [
        f"{name}: a save that did not finish" for name in others
    ]
    hint = f" (rejected {'; '.join(seen)})" if seen else ""
    raise CheckpointError(
        f"{p} holds no complete checkpoint{hint}; pass a run folder with "
        "checkpoints/step_NNNNNNN/manifest.json, a checkpoint folder or an export folder"
    )


def read_checkpoint_weights(ckpt: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(meta, params)`` of a complete checkpoint folder: ``meta.json`` and the full fp32
    parameters under the model's own names.

    Raises:
        CheckpointError: ``meta.json`` has no model shape, or stage files are missing, unreadable
            (truncated) or do not cover every pipeline stage.
    """
    meta = json.loads((ckpt / "meta.json").read_text())
    if "model" not in meta:
        raise CheckpointError(
            f"{ckpt / 'meta.json'} records no model shape ('model'); it was not written "
            "by `mla train`"
        )
    folder = ckpt / meta.get("tag", TAG)
    stages = sorted(folder.glob("stage_*.pt"))
    expected = int(meta.get("layout", {}).get("pp", 1))
    if not (folder / "state.json").is_file() or len(stages) != expected:
        raise CheckpointError(
            f"{folder} is incomplete: expected state.json and {expected} stage file(s), found "
            f"{[s.name for s in stages] or 'none'}; use another checkpoint"
        )
    params: dict[str, torch.Tensor] = {}
    for stage in stages:
        try:
            content = torch.load(stage, map_location="cpu", weights_only=True)
        except Exception as exc:  # truncated or corrupt zip/pickle: several exception types
            raise CheckpointError(
                f"{stage} cannot be read ({type(exc).__name__}: {exc}); the file is truncated "
                "or corrupt, use another checkpoint"
            ) from None
        for name, t in content.get("param", {}).items():
            params.setdefault(name, t)
    return meta, params


def load_model(
    path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
) -> LoadedModel:
    """Load a model for inference (see the module docstring for what ``path`` may be).

    Args:
        path: Run folder, checkpoint folder or export folder.
        device: Where to put the model.
        dtype: Cast parameters (default fp32 as stored).

    Returns:
        A :class:`LoadedModel` (model in eval mode).

    Raises:
        CheckpointError: missing, incomplete or unreadable input, or weights that do not fit the
            recorded model shape.
    """
    p = Path(path).expanduser()
    if p.is_dir() and is_pretrained_dir(p):
        try:
            model = load_pretrained(p, device, dtype)
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{p}: {exc}") from None
        return LoadedModel(model, model.cfg, p, "export", tokenizer=stored_tokenizer(p))
    ckpt, skipped = resolve_checkpoint_noting_skips(p)
    meta, params = read_checkpoint_weights(ckpt)
    try:
        cfg = ModelConfig(**meta["model"])
        model = build_model(cfg, params, str(ckpt))
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{ckpt}: {exc}") from None
    model = model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)
    run_dir = ckpt.parent.parent
    job_path = run_dir / "job.json"
    job = json.loads(job_path.read_text()) if job_path.is_file() else None
    step = int(meta.get("step", -1))
    return LoadedModel(
        model, cfg, p, "checkpoint", ckpt, step, run_dir, job, skipped, stored_tokenizer(ckpt)
    )


def stored_tokenizer(folder: Path) -> Tokenizer:
    """The tokenizer saved in a checkpoint or export folder (``tokenizer.json``); the byte
    tokenizer for folders written before tokenizers were stored.

    Raises:
        CheckpointError: the file is there but is not a tokenizer.
    """
    path = folder / TOKENIZER_FILE
    if not path.is_file():
        return ByteTokenizer()
    try:
        return tokenizer_from_json(path.read_text(encoding="utf-8"), str(path))
    except ValueError as exc:
        raise CheckpointError(str(exc)) from None


@dataclass
class LoadedOnnx:
    """An ONNX model ready for inference (:class:`mla.compress.onnx_export.OnnxLM`).

    Attributes:
        model: The ONNX Runtime model.
        cfg: Its configuration (stored in the file).
        source: The ``.onnx`` file.
        job: ``job.json`` next to the file (``mla compress`` copies the run's), when present.
    """

    model: Any
    cfg: ModelConfig
    source: Path
    job: dict | None = field(default=None, repr=False)


#: ONNX files looked for, in order, when ``--onnx`` names a folder (``mla compress --out``).
ONNX_NAMES = ("model.int8.onnx", "model.onnx")


def load_onnx(path: str | Path, threads: int = 1) -> LoadedOnnx:
    """Load an ONNX export: a ``.onnx`` file or a folder holding ``model.int8.onnx`` /
    ``model.onnx`` (the output folder of ``mla compress``).

    Raises:
        CheckpointError: no such file, no ONNX model in the folder, the ``compress`` extra is
            not installed, or the file is not an ONNX model exported by mla.
    """
    p = Path(path).expanduser()
    if p.is_dir():
        found = [p / n for n in ONNX_NAMES if (p / n).is_file()]
        if not found:
            raise CheckpointError(
                f"{p} holds no {' or '.join(ONNX_NAMES)}; pass a .onnx file or the --out "
                "folder of `mla compress`"
            )
        p = found[0]
    try:
        from mla.compress.onnx_export import OnnxLM

        model = OnnxLM(p, threads=threads)
    except ImportError as exc:
        raise CheckpointError(
            f"--onnx needs onnxruntime ({exc.name} is missing); pip install 'mla-train[compress]'"
        ) from None
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{p}: {exc}") from None
    job_path = p.parent / "job.json"
    job = json.loads(job_path.read_text()) if job_path.is_file() else None
    return LoadedOnnx(model, model.cfg, p, job)
