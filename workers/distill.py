"""``train.distill`` on the workers: the teacher beside the student, and the loss that uses it.

:class:`DistillLoss` wraps the run's ordinary loss function (the ``loss_fn`` of
:class:`workers.parallel.pipeline.SequentialLM` or of DeepSpeed's ``PipelineModule``), so the
loss is computed where it always is: in the one process for ``pp == 1``, on the last stage of a
pipeline (the only stage DeepSpeed calls ``loss_fn`` on). Training micro-batches carry
``(targets, inputs)`` as their labels (:meth:`workers.parallel.engine.ParallelEngine.
train_batch`), so the last stage has the token ids the teacher needs; under tensor parallelism the
vocabulary-sharded logits are gathered whole first (the KL needs every id's probability); evaluation batches carry
plain targets and get the ordinary cross-entropy, so ``val_loss`` compares with any run.

The teacher is loaded once per process, on first use (so pipeline stages that never compute the
loss never hold it), with :func:`workers.inference.load_model` (the loader of ``mla generate``,
``mla eval`` and ``model.init_from``): fp32, eval mode, ``requires_grad=False``. It is a plain
attribute of a plain object, not a submodule: DeepSpeed never wraps it, the optimizer never sees
it, and checkpoints hold the student only.

Loss (:func:`mla.compress.distill.distillation_objective`, the formula ``mla compress`` uses in
process): ``kl_weight * T^2 * KL(teacher_T || student_T) + lm_weight * CE``, means over tokens.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from mla.compress.distill import distillation_objective
from orchestrator.contract.distill import DistillPlan


class DistillLoss:
    """``loss_fn(logits, labels)``: the distillation objective for ``(targets, inputs)`` labels,
    the wrapped ordinary loss for plain ``targets``.

    Args:
        base: The ordinary loss ``(logits, targets) -> scalar`` (evaluation).
        plan: Teacher and weights.
        vocab_size: Real vocabulary size (logit columns past it are padding).
        device: Where the teacher runs.
    """

    def __init__(self, base, plan: DistillPlan, vocab_size: int, device: torch.device):
        self.base, self.plan, self.vocab_size, self.device = base, plan, vocab_size, device
        self._teacher: torch.nn.Module | None = None
        self.sums = torch.zeros(3, dtype=torch.float64)  # kl, ce, micro-batches since last take

    @property
    def teacher(self) -> torch.nn.Module:
        """The frozen teacher (loaded on first use)."""
        if self._teacher is None:
            self._teacher = load_teacher(self.plan, self.device)
        return self._teacher

    def __call__(self, logits: torch.Tensor, labels) -> torch.Tensor:
        """Args: ``logits`` ``(batch, seq, vocab)``; ``labels`` ``(batch, seq)`` targets, or the
        pair ``(targets, inputs)`` of ``(batch, seq)`` int64 tensors. Returns the scalar loss."""
        if torch.is_tensor(labels):
            return self.base(logits, labels)
        targets, inputs = labels
        with torch.no_grad():
            teacher_logits = self.teacher(inputs)
        student = self._whole(logits)[..., : self.vocab_size]  # padded ids' columns dropped
        p = self.plan
        loss, kl, ce = distillation_objective(
            student, teacher_logits, targets, p.temperature, p.kl_weight, p.lm_weight
        )
        if ce is None:  # logged all the same: the user sees the student's next-token loss
            with torch.no_grad():
                ce = F.cross_entropy(student.detach().flatten(0, 1).float(), targets.flatten())
        self.sums += torch.tensor([float(kl), float(ce), 1.0], dtype=torch.float64)
        return loss

    def _whole(self, logits: torch.Tensor) -> torch.Tensor:
        """The logits of every id: gathered over the tensor-parallel group, whose ranks each
        hold a vocabulary shard (``base.groups``, :class:`workers.parallel.pipeline.
        VocabParallelLoss`), then every tensor rank computes the same loss."""
        groups = getattr(self.base, "groups", None)
        if groups is None or groups.layout.tp == 1:
            return logits
        from workers.parallel.tensor_parallel import gather_from_group

        return gather_from_group(logits, groups.tp_group, groups.layout.tp)

    def take_metrics(self, device: torch.device) -> dict[str, float]:
        """``{"kl_loss", "lm_loss"}``: means over the micro-batches since the last call, over
        every rank that computed a loss (collective over the whole world: call on every rank)."""
        sums = self.sums.clone().to(device)
        self.sums.zero_()
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(sums)
        if sums[2] == 0:
            return {}
        return {"kl_loss": float(sums[0] / sums[2]), "lm_loss": float(sums[1] / sums[2])}


def load_teacher(plan: DistillPlan, device: torch.device) -> torch.nn.Module:
    """The teacher of ``plan`` in fp32, eval mode, every parameter frozen.

    Raises:
        CheckpointError: the teacher folder cannot be read.
    """
    from workers.inference import load_model

    teacher = load_model(plan.teacher, device=device, dtype=torch.float32).model
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher
