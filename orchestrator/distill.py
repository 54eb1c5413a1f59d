"""Distillation before launch: resolve ``train.distill.teacher`` and check it fits the run.

:func:`plan_distill` runs on the driver before anything starts (torch is imported inside). The
teacher is read the way ``model.init_from``, ``mla generate`` and ``mla eval`` read a model (a
run folder means its newest verified checkpoint); only its recorded config and tokenizer are
read here, not its weights. Refused, each with the field, the values and the fix:

* a teacher whose vocabulary or tokenizer is not the run's (the KL compares the same ids);
* a teacher whose ``max_seq_len`` is below ``data.seq_len``;
* DP-SGD (its per-sequence step computes its own loss). Every ``(dp, tp, pp)`` layout and ZeRO
  stage distils: each worker holds the whole teacher beside its part of the student, and under
  tensor parallelism the vocabulary-sharded logits are gathered whole for the KL
  (:mod:`workers.distill`).

The student's shape may differ from the teacher's: that is the point (a pruned student).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from orchestrator.config import JobConfig
from orchestrator.contract.distill import DistillPlan
from orchestrator.contract.errors import CheckpointError, ConfigError
from orchestrator.contract.run_plan import RunPlan


def plan_distill(job: JobConfig) -> DistillPlan | None:
    """The run's :class:`DistillPlan`, or ``None`` without ``train.distill``.

    Raises:
        ConfigError: the teacher does not fit the run, or the run uses DP-SGD.
        CheckpointError: the teacher is missing, unfinished or fails verification.
    """
    d = job.train.distill
    if d is None:
        return None
    _refuse_privacy(job)
    from workers.init_weights import resolve_init_source

    try:
        kind, folder, _, _ = resolve_init_source(str(d.teacher))
    except CheckpointError as exc:
        raise CheckpointError(f"train.distill.teacher: {exc}") from None
    recorded = _recorded_model(kind, folder)
    _check_teacher(job, recorded, folder)
    return DistillPlan(str(folder), kind, d.temperature, d.kl_weight, d.lm_weight)


def _refuse_privacy(job: JobConfig) -> None:
    if job.train.privacy is not None:
        raise ConfigError(
            "train.distill with train.privacy: DP-SGD's per-sequence step computes its own "
            "loss and is not wired for distillation; drop one of them"
        )


def _recorded_model(kind: str, folder: Path) -> dict:
    name = "config.json" if kind == "export" else "meta.json"
    try:
        return dict(json.loads((folder / name).read_text())["model"])
    except (OSError, ValueError, KeyError) as exc:
        raise CheckpointError(
            f"train.distill.teacher={folder}: cannot read the model from {name} ({exc})"
        ) from None


def _check_teacher(job: JobConfig, recorded: dict, folder: Path) -> None:
    cfg = job.model_config_()
    where = f"train.distill.teacher={folder}"
    vocab = recorded.get("vocab_size")
    if vocab != cfg.vocab_size:
        raise ConfigError(
            f"{where}: the teacher has vocab_size={vocab} and the student model.vocab_size="
            f"{cfg.vocab_size}; the KL compares the same token ids: use the teacher's vocabulary "
            "(model.vocab_size and data.tokenizer) or another teacher"
        )
    longest = recorded.get("max_seq_len")
    if longest is not None and longest < job.data.seq_len:
        raise ConfigError(
            f"{where}: the teacher's max_seq_len={longest} < data.seq_len={job.data.seq_len}; "
            f"set data.seq_len <= {longest}"
        )
    _check_tokenizer(job, folder, where)


def _check_tokenizer(job: JobConfig, folder: Path, where: str) -> None:
    from workers.inference import stored_tokenizer
    from workers.tokenizer_spec import job_tokenizer, tokenizer_file

    path = tokenizer_file(job)
    if job.data.tokenizer == "bpe" and path is not None and not path.is_file():
        raise ConfigError(
            f"{where}: data.tokenizer=bpe trains a new tokenizer, which the teacher does not "
            f"know; set data.tokenizer to the teacher's tokenizer ({folder / 'tokenizer.json'})"
        )
    mine, theirs = job_tokenizer(job), stored_tokenizer(folder)
    if mine.to_json() != theirs.to_json():
        raise ConfigError(
            f"{where}: the teacher's tokenizer ({theirs.kind}, {theirs.vocab_size} ids) is not "
            f"the run's ({mine.kind}, {mine.vocab_size} ids); set data.tokenizer to "
            f"{folder / 'tokenizer.json'} or choose a teacher trained with this tokenizer"
        )


def attach_distill(job: JobConfig, plan: RunPlan) -> RunPlan:
    """``plan`` with the run's :class:`DistillPlan` (see :func:`plan_distill`)."""
    return dataclasses.replace(plan, distill=plan_distill(job))
