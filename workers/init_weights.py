"""``model.init_from``: start a run from the weights of a checkpoint or an export, not its state.

The source is read by the inference loader (:mod:`workers.inference`): a run folder means its
newest verified checkpoint, a ``step_NNNNNNN`` folder must verify against its manifest, an
``mla export`` folder is read from its ``model.safetensors``. Only the parameters are taken:
AdamW's moments, its step count, the LR schedule and the training step start afresh (the
Hugging Face ``from_pretrained`` convention). :func:`init_problem` compares the source with the
job's model before launch and names the first mismatch; :func:`load_init_weights` writes the
tensors into this rank's shards (the same slicing as a resume,
:func:`workers.parallel.reshard.write_parameters`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mla.config import ModelConfig
from mla.pretrained import CONFIG, WEIGHTS, is_pretrained_dir
from orchestrator.contract.errors import CheckpointError
from workers.inference import read_checkpoint_weights, resolve_checkpoint_noting_skips

#: ModelConfig fields that decide parameter names or shapes (the others -- window, top-k,
#: block size, dropout, rope -- may change in a fine-tune).
SHAPE_FIELDS = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "ffn_hidden")
NAME_FIELDS = ("attention", "mix", "attn_head_dim")


def resolve_init_source(path: str | Path) -> tuple[str, Path, int | None, tuple[str, ...]]:
    """``(kind, folder, step, skipped)`` of ``model.init_from``: ``("export", DIR, None, ())``
    or ``("checkpoint", step folder, step, skipped)``, where ``skipped`` names the newer
    checkpoints of a run folder that failed verification (``"step_N: reason"``).

    Raises:
        CheckpointError: the path is missing, an unfinished save, or holds no verified checkpoint.
    """
    p = Path(path).expanduser().resolve()
    if p.is_dir() and is_pretrained_dir(p):
        return "export", p, None, ()
    ckpt, skipped = resolve_checkpoint_noting_skips(p)
    meta = json.loads((ckpt / "meta.json").read_text())
    return "checkpoint", ckpt, int(meta.get("step", -1)), skipped


def read_init_source(kind: str, folder: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(model fields as recorded, {name: full fp32 tensor})`` of a resolved source.

    Raises:
        CheckpointError: a stage file is missing or unreadable, or the export is malformed.
    """
    if kind == "export":
        from safetensors.torch import load_file

        try:
            config = json.loads((folder / CONFIG).read_text())
            return dict(config.get("model", {})), load_file(str(folder / WEIGHTS))
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{folder}: cannot read the export ({exc})") from None
    meta, params = read_checkpoint_weights(folder)
    return dict(meta["model"]), params


def init_problem(
    cfg: ModelConfig,
    expected: dict[str, tuple[int, ...]],
    recorded: dict,
    tensors: dict[str, torch.Tensor],
    where: str,
) -> str | None:
    """Why the source cannot initialise this job's model (first mismatch), or ``None``.

    Args:
        cfg: The job's model.
        expected: ``{name: shape}`` of the job's model (:func:`mla.freeze.parameter_shapes`).
        recorded: The source's recorded model fields.
        tensors: The source's parameters.
        where: The source folder, named in the message.
    """
    problem = _first_tensor_mismatch(expected, tensors)
    if problem is None:
        return None
    fields = [
        f"model.{k}: {getattr(cfg, k)!r} here, {recorded[k]!r} in the source"
        for k in (*SHAPE_FIELDS, *NAME_FIELDS)
        if k in recorded and recorded[k] != getattr(cfg, k)
    ]
    fix = f"set {fields[0].split(':')[0]} to the source's value" if fields else "check the source"
    detail = f" ({'; '.join(fields)})" if fields else ""
    return (
        f"model.init_from={where}: {problem}{detail}; {fix} (or choose a checkpoint of this "
        "model's shape)"
    )


def _first_tensor_mismatch(
    expected: dict[str, tuple[int, ...]], tensors: dict[str, torch.Tensor]
) -> str | None:
    for name, shape in expected.items():
        if name not in tensors:
            return f"parameter {name} {shape} is not in the source"
        got = tuple(tensors[name].shape)
        if got != tuple(shape):
            return (
                f"parameter {name} has shape {got} in the source and {tuple(shape)} in this model"
            )
    extra = [n for n in tensors if n not in expected]
    if extra:
        return f"the source has parameter {extra[0]}, which this model lacks"
    return None


def load_init_weights(adapter, kind: str, folder: str | Path) -> int:
    """Write the source's weights into this rank's engine (model and ZeRO's fp32 master copy);
    the optimizer state is left empty. Returns the number of tensors written on this rank.

    Raises:
        CheckpointError: the source cannot be read.
        RuntimeError: a parameter of this rank is missing or of another shape (the driver's
            :func:`init_problem` refuses that before launch).
    """
    from workers.parallel.reshard import write_parameters

    _, tensors = read_init_source(kind, Path(folder))
    return write_parameters(adapter, tensors, str(folder))
