"""Recovery by logit distillation: the KL loss is a real divergence and training lowers it."""

import numpy as np
import torch

from mla.compress.distill import distill, distillation_loss
from mla.compress.importance import measure_importance
from mla.compress.prune import apply_pruning, plan_pruning
from tests.compress_fixture import corpus_windows, train_tiny, val_batch


def test_distillation_loss_is_zero_only_for_equal_logits():
    z = torch.randn(2, 5, 16)
    assert float(distillation_loss(z, z)) < 1e-6
    assert float(distillation_loss(z, z + 3.0)) < 1e-5  # softmax is shift-invariant
    assert float(distillation_loss(z, 2 * z)) > 1e-2


def test_distillation_recovers_part_of_the_pruning_loss():
    torch.set_num_threads(1)
    teacher = train_tiny(steps=80)
    x, _ = val_batch(4)
    calib = [x[:2], x[2:]]
    student = apply_pruning(
        teacher, plan_pruning(measure_importance(teacher, calib), teacher.cfg, 32, 1)
    )
    train, _ = corpus_windows(64)
    batches = (
        tuple(torch.from_numpy(a) for a in train.windows(np.arange(i * 8, i * 8 + 8)))
        for i in range(10_000)
    )
    with torch.no_grad():
        before = float(distillation_loss(student(x), teacher(x)))
    losses = distill(student, teacher, batches, steps=40, lr=3e-3)
    with torch.no_grad():
        after = float(distillation_loss(student(x), teacher(x)))
    assert len(losses) == 40 and not student.training
    assert after < 0.7 * before
