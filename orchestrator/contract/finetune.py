"""``FinetunePlan``: which weights a run starts from and which parameters it trains.

Built once on the driver (:func:`orchestrator.finetune.plan_finetune`), after the init source
was resolved and checked against the model and every freeze rule was validated, and shipped to
the workers inside the :class:`~orchestrator.contract.run_plan.RunPlan`. Pure data.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FinetunePlan:
    """The fine-tuning part of a run (also present, empty, for a run from scratch).

    Attributes:
        frozen: Parameter names (unsharded :class:`mla.model.MLATransformer` names) with
            ``requires_grad = False``: no gradient, no optimizer state, no all-reduce.
        trainable_parameters: Elements of the parameters that train.
        total_parameters: Elements of every parameter (the tied head counted once).
        init_from: The resolved checkpoint or export folder to take the weights from, or
            ``None`` (the seed's initialisation). A checkpoint of the run itself wins over it.
        init_kind: ``"checkpoint"`` or ``"export"`` (with ``init_from``).
        init_step: Training step of that checkpoint (``None`` for an export).
    """

    frozen: frozenset[str] = frozenset()
    trainable_parameters: int = 0
    total_parameters: int = 0
    init_from: str | None = None
    init_kind: str | None = None
    init_step: int | None = None

    def describe(self) -> str:
        """Trainable share for the header, e.g. ``"402,952 trainable, 48.0%"``."""
        share = self.trainable_parameters / max(1, self.total_parameters)
        return f"{self.trainable_parameters:,} trainable, {share:.1%}"

    def describe_source(self) -> str:
        """Where the weights come from, e.g. ``"init_from: checkpoint step 300 /abs/runs/tiny/
        checkpoints/step_0000300 (weights only; a checkpoint of this run wins)"``."""
        step = f" step {self.init_step}" if self.init_step is not None else ""
        return (
            f"init_from: {self.init_kind}{step} {self.init_from} (weights only; a checkpoint "
            "of this run wins)"
        )

    def to_dict(self) -> dict:
        """JSON form for ``summary.json`` (without the frozen names, which the job implies)."""
        return {
            "trainable_parameters": self.trainable_parameters,
            "total_parameters": self.total_parameters,
            "frozen_parameter_tensors": len(self.frozen),
            "init_from": self.init_from,
            "init_step": self.init_step,
        }
