"""Dropout is seeded per step and rank: the same step draws the same masks whatever ran before."""

from __future__ import annotations

import torch

from mla.config import PRESETS
from mla.model import MLATransformer
from workers.rng import seed_step, step_seed


def _loss(model, step: int, dp_rank: int = 0) -> float:
    seed_step(1234, step, dp_rank)
    x = torch.arange(64).reshape(2, 32) % 256
    return (
        float(model(x, x).detach())
        if _returns_loss(model)
        else float(model(x).float().mean().detach())
    )


def _returns_loss(model) -> bool:
    import inspect

    return len(inspect.signature(model.forward).parameters) > 1


def test_same_step_same_dropout_whatever_ran_before(one_torch_thread):
    torch.manual_seed(0)
    model = MLATransformer(PRESETS["tiny"].replace(dropout=0.5, max_seq_len=32)).train()
    first = _loss(model, step=7)
    torch.rand(1000)  # another history of random draws (a restarted process)
    _loss(model, step=3)
    assert _loss(model, step=7) == first
    assert _loss(model, step=8) != first
    assert _loss(model, step=7, dp_rank=1) != first


def test_step_seeds_differ_by_step_rank_and_base_seed():
    seeds = {
        step_seed(s, t, r, p) for s in (0, 1) for t in range(50) for r in range(4) for p in range(2)
    }
    assert len(seeds) == 2 * 50 * 4 * 2 and all(0 <= v < 2**63 for v in seeds)
