"""Recovery of a pruned model by logit distillation from the unpruned teacher.

Loss per token (Hinton et al. 2015, "Distilling the Knowledge in a Neural Network", eq. 2 with
temperature T): ``T^2 * KL(softmax(z_t / T) || softmax(z_s / T))``, averaged over tokens, plus
optionally ``lm_weight`` times the ordinary next-token cross-entropy. Minitron (Muralidharan et
al. 2024, Sec. 3) finds the forward KL on logits alone sufficient for width-pruned models.

This module holds the in-process single-device loop (AdamW, cosine decay to 10 %) and
:func:`distillation_objective`, the one formula both it and the Ray Train + DeepSpeed trainer
(``train.distill``, :mod:`workers.distill`) use.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

from mla.model import MLATransformer

#: ``loss_fn(student, inputs, targets, teacher_logits) -> (loss, student_logits)``.
LossFn = Callable[
    [MLATransformer, torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]
]


def distillation_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Mean over tokens of ``T^2 * KL(p_teacher || p_student)`` at temperature ``T``.

    Args:
        student_logits: ``(batch, seq, vocab)``.
        teacher_logits: ``(batch, seq, vocab)`` (no gradient needed).
        temperature: Softening temperature T > 0.

    Returns:
        Scalar loss in nats per token.
    """
    s = F.log_softmax(student_logits.float().flatten(0, 1) / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.float().flatten(0, 1) / temperature, dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature**2


def distillation_objective(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    kl_weight: float = 1.0,
    lm_weight: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``kl_weight * T^2 * KL(p_teacher_T || p_student_T) + lm_weight * CE(student, targets)``.

    Hinton et al. 2015 (arXiv:1503.02531, Sec. 2): the soft-target term is scaled by ``T^2`` so
    its gradient keeps its size when the temperature changes; the hard-target term is the
    ordinary next-token cross-entropy at temperature 1. Both are means over tokens.

    Args:
        student_logits: ``(batch, seq, vocab)``.
        teacher_logits: ``(batch, seq, vocab)`` (no gradient needed).
        targets: ``(batch, seq)`` int64 next-token ids.
        temperature: Softening temperature T > 0.
        kl_weight: Weight of the distillation term.
        lm_weight: Weight of the cross-entropy term (0 leaves it out and does not compute it).

    Returns:
        ``(loss, kl, ce)``: the scalar loss, the unweighted ``T^2 * KL`` term, and the
        unweighted cross-entropy (``None`` when ``lm_weight`` is 0), in nats per token.
    """
    kl = distillation_loss(student_logits, teacher_logits, temperature)
    loss = kl_weight * kl
    ce = None
    if lm_weight:
        ce = F.cross_entropy(student_logits.flatten(0, 1).float(), targets.flatten())
        loss = loss + lm_weight * ce
    return loss, kl, ce


def distill(
    student: MLATransformer,
    teacher: MLATransformer,
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
    steps: int,
    lr: float = 1e-3,
    lm_weight: float = 0.0,
    progress: Callable[[int, float], None] | None = None,
    loss_fn: LossFn | None = None,
) -> list[float]:
    """Train ``student`` for ``steps`` AdamW steps to match ``teacher``'s logits.

    Args:
        student: Model to train (in place; left in eval mode).
        teacher: Frozen teacher (eval mode, no gradients).
        batches: Yields ``(inputs, targets)`` ``(batch, seq)`` int64 pairs.
        steps: Optimiser steps (0 returns at once).
        lr: Peak learning rate; cosine decay to ``0.1 * lr`` (Loshchilov & Hutter 2017).
        lm_weight: Weight of the next-token cross-entropy added to the KL term.
        progress: Optional ``callable(step, loss)`` after each step.
        loss_fn: ``loss_fn(student, inputs, targets, teacher_logits) -> (loss, logits)``
            replacing the KL of the student's final logits (e.g.
            :func:`mla.compress.early_exit.early_exit_loss`); ``lm_weight`` applies to its
            logits.

    Returns:
        The loss of every step.
    """
    teacher.eval()
    student.train()
    opt = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.0)
    losses: list[float] = []
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * (0.1 + 0.45 * (1 + math.cos(math.pi * step / max(1, steps))))
        x, y = next(batches)
        with torch.no_grad():
            target = teacher(x)
        if loss_fn is None:
            loss = distillation_objective(student(x), target, y, lm_weight=lm_weight)[0]
        else:
            loss, logits = loss_fn(student, x, y, target)
            if lm_weight:
                ce = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
                loss = loss + lm_weight * ce
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if progress is not None:
            progress(step + 1, losses[-1])
    student.eval()
    return losses
