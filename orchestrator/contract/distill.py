"""``DistillPlan``: the teacher a distillation run (``train.distill``) matches, and the weights
of its loss. Built on the driver (:func:`orchestrator.distill.plan_distill`) after the teacher
was resolved and checked against the job; shipped to the workers inside the
:class:`~orchestrator.contract.run_plan.RunPlan`. Pure data.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DistillPlan:
    """The distillation part of a run.

    Attributes:
        teacher: The resolved checkpoint or export folder (absolute).
        teacher_kind: ``"checkpoint"`` or ``"export"``.
        temperature: Softening temperature T.
        kl_weight: Weight of ``T^2 * KL(teacher_T || student_T)``.
        lm_weight: Weight of the next-token cross-entropy.
    """

    teacher: str
    teacher_kind: str
    temperature: float = 1.0
    kl_weight: float = 1.0
    lm_weight: float = 0.0

    def describe(self) -> str:
        """One header line, e.g. ``"distill: teacher export /abs/t (T=1, 1*KL + 0*CE)"``."""
        return (
            f"distill: teacher {self.teacher_kind} {self.teacher} (T={self.temperature:g}, "
            f"{self.kl_weight:g}*KL + {self.lm_weight:g}*CE)"
        )
