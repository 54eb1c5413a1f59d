"""Divergence guard: stop a run whose optimizer steps are non-finite or skipped.

Every step reports its loss (mean over data-parallel ranks), the global gradient norm (``None``
when DeepSpeed does not compute one) and how many steps DeepSpeed skipped (a ZeRO or fp16
optimizer skips a step whose gradients overflowed, leaving the parameters and the lr unchanged).
``max_bad_steps`` consecutive bad steps raise :class:`Diverged`. Every input is identical on all
ranks (all-reduced), so every rank stops at the same step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

FIXES = (
    "lower train.lr",
    "set train.grad_clip (e.g. 1.0)",
    "with fp16 use bf16 (fp16 overflows; its loss-scale calibration also skips the first steps)",
    "or raise train.max_bad_steps if a few bad steps are expected",
)


class Diverged(Exception):
    """The run diverged; the message names the step, the values and the likely fixes."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.6g}"


@dataclass
class DivergenceGuard:
    """Counts consecutive bad steps.

    Attributes:
        max_bad_steps: Consecutive non-finite or skipped steps that stop the run (>= 1).
        bad: Current run of consecutive bad steps.
        first_bad_step: Step where the current run of bad steps began.
    """

    max_bad_steps: int
    bad: int = 0
    first_bad_step: int | None = None
    _log: list = field(default_factory=list)

    def observe(self, step: int, loss: float, grad_norm: float | None, skipped: int) -> None:
        """Record one optimizer step.

        Args:
            step: The step just taken (1-based).
            loss: Its loss (mean token cross-entropy, nats).
            grad_norm: Its global gradient 2-norm, or ``None`` if unknown.
            skipped: Optimizer steps DeepSpeed skipped during it (0 or 1).

        Raises:
            Diverged: ``max_bad_steps`` consecutive bad steps.
        """
        reasons = []
        if not math.isfinite(loss):
            reasons.append(f"loss {_fmt(loss)}")
        if grad_norm is not None and not math.isfinite(grad_norm):
            reasons.append(f"gradient norm {_fmt(grad_norm)}")
        if skipped:
            reasons.append("DeepSpeed skipped the optimizer step (gradient overflow)")
        if not reasons:
            self.bad, self.first_bad_step, self._log = 0, None, []
            return
        self.bad += 1
        self.first_bad_step = self.first_bad_step or step
        self._log.append(
            f"step {step}: {', '.join(reasons)} (loss {_fmt(loss)}, grad norm {_fmt(grad_norm)})"
        )
        if self.bad >= self.max_bad_steps:
            raise Diverged(
                f"training diverged: {self.bad} consecutive bad steps from step {self.first_bad_step} "
                f"(train.max_bad_steps={self.max_bad_steps}): "
                + "; ".join(self._log[-3:])
                + ". Likely fixes: "
                + "; ".join(FIXES),
                step,
            )

    @staticmethod
    def params_diverged(step: int) -> Diverged:
        """The error for non-finite parameters found before writing the checkpoint of ``step``."""
        return Diverged(
            f"training diverged: the parameters hold NaN or Inf at step {step}; no checkpoint was "
            "written from them and the older checkpoints are kept. Likely fixes: "
            + "; ".join(FIXES),
            step,
        )
