"""The learning-rate schedule as a pure function of the optimizer step (stateless, so a resumed
or restarted run uses exactly the lr of an uninterrupted one, and a step DeepSpeed skips on
overflow does not shift it).

Linear warm-up over steps ``1..warmup`` (step 1 already runs at ``lr / warmup``, not 0, as
torchtitan's ``linear_warmup`` does), then cosine decay (Loshchilov & Hutter 2017, SGDR eq. 5)
from ``lr`` to ``min_lr`` at step ``steps``. ``warmup = 0`` means no warm-up.
"""

from __future__ import annotations

import math


def lr_at(step: int, steps: int, lr: float, min_lr: float, warmup: int) -> float:
    """The learning rate optimizer step ``step`` (1-based) runs at.

    Args:
        step: Optimizer step, 1..steps (steps past ``steps`` stay at ``min_lr``).
        steps: Total optimizer steps of the run.
        lr: Peak learning rate.
        min_lr: Final learning rate (reached at ``step == steps``).
        warmup: Linear warm-up steps; 0 disables the warm-up.

    Returns:
        ``lr * step / warmup`` during warm-up, else
        ``min_lr + (lr - min_lr) * (1 + cos(pi * t)) / 2`` with
        ``t = (step - warmup) / (steps - warmup)`` clipped to [0, 1].

    Example:
        >>> lr_at(1, 100, 1.0, 0.1, 10), lr_at(10, 100, 1.0, 0.1, 10), lr_at(100, 100, 1.0, 0.1, 10)
        (0.1, 1.0, 0.1)
    """
    if warmup > 0 and step <= warmup:
        return lr * max(step, 1) / warmup
    span = max(1, steps - warmup)
    t = min(1.0, max(0.0, (step - warmup) / span))
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * t))


def train_lr(train, step: int) -> float:
    """:func:`lr_at` for a job's ``train`` section (:class:`orchestrator.config.TrainSection`)."""
    return lr_at(step, train.steps, train.lr, train.min_lr, train.warmup_steps)
