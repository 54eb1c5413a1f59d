"""Fine-tuning before launch: check ``model.init_from`` and the freeze rules, count what trains.

:func:`plan_finetune` runs on the driver before anything starts (torch is imported inside):

* ``train.freeze`` / ``train.trainable_last_layers`` / ``train.train_head`` become the set of
  frozen parameter names (:func:`mla.freeze.frozen_parameters`); a pattern that matches nothing,
  ``N`` above ``model.n_layers`` and freezing everything are refused;
* ``model.init_from`` is resolved (a run folder means its newest verified checkpoint; a
  checkpoint must verify against its manifest; an export needs ``config.json`` and
  ``model.safetensors``) and its tensors are compared with the job's model, naming the first
  mismatching parameter with both shapes and the model field to change.

A run that has a checkpoint of its own resumes from it (weights, optimizer state and step), and
``model.init_from`` is then not loaded -- as ``resume_from_checkpoint`` wins over
``from_pretrained`` in Hugging Face Trainer and a job's own checkpoint over
``checkpoint.initial_load_path`` in torchtitan. The source is still checked, so a typo fails
the same way on every attempt.
"""

from __future__ import annotations

import dataclasses

from orchestrator.config import JobConfig
from orchestrator.contract.errors import CheckpointError, ConfigError
from orchestrator.contract.finetune import FinetunePlan
from orchestrator.contract.run_plan import RunPlan


def plan_finetune(job: JobConfig, layouts=()) -> FinetunePlan:
    """The run's :class:`FinetunePlan` (an empty one for a run from scratch).

    Args:
        job: The validated job.
        layouts: The planned layouts (ZeRO-3 cannot freeze or take ``init_from`` yet).

    Raises:
        ConfigError: a freeze rule is invalid, ZeRO-3 was asked for with fine-tuning, or the
            source does not fit the model (the first mismatch is named).
        CheckpointError: ``model.init_from`` is missing, unfinished or fails verification.
    """
    from mla.freeze import count_trainable, frozen_parameters, parameter_shapes

    cfg = job.model_config_()
    shapes = parameter_shapes(cfg)
    t = job.train
    try:
        frozen = frozen_parameters(
            shapes, cfg.n_layers, t.freeze, t.trainable_last_layers, t.train_head
        )
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    tuned = bool(frozen) or job.model.init_from is not None
    _refuse_unsupported(job, layouts, tuned, bool(frozen))
    if frozen:
        _refuse_frozen_stage(cfg.n_layers, list(shapes), frozen, layouts)
    trainable, total = count_trainable(shapes, frozen)
    plan = FinetunePlan(frozen, trainable, total)
    if job.model.init_from is None:
        return plan
    kind, folder, step = _check_source(job.model.init_from, cfg, shapes)
    return dataclasses.replace(plan, init_from=str(folder), init_kind=kind, init_step=step)


def _refuse_unsupported(job: JobConfig, layouts, tuned: bool, frozen: bool) -> None:
    if tuned and any(layout.zero_stage == 3 for layout in layouts):
        raise ConfigError(
            "model.init_from / train.freeze are not supported with parallel.zero_stage=3 "
            "(ZeRO-3 partitions each parameter); use parallel.zero_stage=2"
        )
    if frozen and job.train.privacy is not None:
        raise ConfigError(
            "train.freeze / train.trainable_last_layers with train.privacy: DP-SGD clips the "
            "gradients of every parameter and is not wired for frozen ones yet; drop one of them"
        )


def _refuse_frozen_stage(n_layers: int, names: list[str], frozen, layouts) -> None:
    """DeepSpeed's pipeline engine needs a trainable parameter on every stage (an empty
    optimizer fails, and a frozen first stage sends activations without gradients)."""
    degrees = sorted({layout.pp for layout in layouts if layout.pp > 1})
    if not degrees:
        return
    from workers.parallel.pipeline import stage_prefixes

    for pp in degrees:
        for stage, prefixes in enumerate(stage_prefixes(n_layers, pp)):
            held = [n for n in names if any(n.startswith(p) for p in prefixes)]
            if all(n in frozen for n in held):
                raise ConfigError(
                    f"under parallel.pipeline={pp} stage {stage} holds only frozen parameters "
                    f"({', '.join(p.rstrip('.') for p in prefixes)}); DeepSpeed's pipeline needs "
                    "one trainable parameter per stage: train more layers "
                    "(train.trainable_last_layers), set train.train_head=true, or lower "
                    "parallel.pipeline"
                )


def _check_source(path: str, cfg, shapes):
    from workers.init_weights import init_problem, read_init_source, resolve_init_source

    try:
        kind, folder, step, skipped = resolve_init_source(path)
        recorded, tensors = read_init_source(kind, folder)
    except CheckpointError as exc:
        raise CheckpointError(f"model.init_from: {exc}") from None
    from orchestrator.cli_common import err

    for newer in skipped:
        err.print(f"warning: model.init_from skipped the newer checkpoint {newer}; using {folder}")
    problem = init_problem(cfg, shapes, recorded, tensors, str(folder))
    if problem:
        raise ConfigError(problem)
    return kind, folder, step


def attach_finetune(job: JobConfig, plan: RunPlan) -> RunPlan:
    """``plan`` with the run's :class:`FinetunePlan` (see :func:`plan_finetune`)."""
    return dataclasses.replace(plan, finetune=plan_finetune(job, list(plan.layouts.values())))
