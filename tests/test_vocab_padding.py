"""Vocabulary padding for tensor parallelism (Megatron's make-vocab-size-divisible-by): a
vocabulary that tp does not divide (257 over tp=2) is padded to 258 rows, the padded logit is
masked, and loss and gradients of the real rows equal the unpadded single-process model's."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mla.config import get_preset
from orchestrator.contract.layout import padded_vocab_size
from tests.harness.local import run_local

CFG = get_preset("tiny").replace(vocab_size=257)
SEED = 3


def _data(cfg=CFG) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (2, 16), generator=g)
    tokens[0, 0] = cfg.vocab_size - 1  # the last real id: an edge of the last shard
    targets = torch.randint(0, cfg.vocab_size, (2, 16), generator=g)
    targets[1, -1] = cfg.vocab_size - 1
    mix = torch.randn(cfg.d_model, cfg.d_model, generator=g) / cfg.d_model**0.5
    return tokens, targets, mix


def _forward(embed, head, tokens, targets, mix, loss_fn):
    """Embedding -> a fixed linear map -> the tied head -> mean cross-entropy."""
    return loss_fn(head(embed(tokens) @ mix), targets)


def _tp_worker(rank: int, world_size: int, cfg) -> dict:
    import torch.distributed as dist

    from workers.parallel.pipeline import EmbeddingLayer
    from workers.parallel.tensor_parallel import vocab_parallel_cross_entropy

    group = dist.new_group(list(range(world_size)))
    layer = EmbeddingLayer(cfg, SEED, rank, world_size, group)
    tokens, targets, mix = _data(cfg)
    loss = _forward(
        layer,
        layer.logits,
        tokens,
        targets,
        mix,
        lambda z, t: vocab_parallel_cross_entropy(z, t, layer.vocab_start, group, world_size),
    )
    loss.backward()
    return {"loss": loss.item(), "weight": layer.weight.detach(), "grad": layer.weight.grad}


def test_padded_vocab_size_rounds_up_to_a_multiple_of_tp():
    assert [padded_vocab_size(257, tp) for tp in (1, 2, 4, 8)] == [257, 258, 260, 264]


@pytest.mark.slow
@pytest.mark.parametrize("vocab, tp", [(257, 2), (5, 4)])  # (5, 4): the last rank is all padding
def test_a_padded_vocab_matches_the_unpadded_model(vocab, tp):
    from workers.parallel.pipeline import EmbeddingLayer

    torch.set_num_threads(1)
    cfg = CFG.replace(vocab_size=vocab)
    ranks = run_local(_tp_worker, tp, cfg, timeout_s=300)
    full = EmbeddingLayer(cfg, SEED, 0, 1, None)  # tp=1: no padding, the reference weights
    assert full.weight.shape == (vocab, cfg.d_model)
    tokens, targets, mix = _data(cfg)
    loss = _forward(
        lambda t: F.embedding(t, full.weight),
        lambda x: F.linear(x, full.weight),
        tokens,
        targets,
        mix,
        lambda z, t: F.cross_entropy(z.reshape(-1, z.size(-1)), t.reshape(-1)),
    )
    loss.backward()

    weight = torch.cat([r["weight"] for r in ranks])
    grad = torch.cat([r["grad"] for r in ranks])
    assert weight.shape == (padded_vocab_size(vocab, tp), cfg.d_model)
    assert torch.equal(weight[:vocab], full.weight.detach())  # same initial real rows
    assert not weight[vocab:].any()  # the padding rows are zeros
    for r in ranks:
        assert r["loss"] == pytest.approx(loss.item(), rel=1e-6)
    torch.testing.assert_close(grad[:vocab], full.weight.grad, rtol=1e-5, atol=1e-7)
    assert not grad[vocab:].any()  # the padded rows never train


def test_a_vocab_tp_does_not_divide_is_planned_and_runs_padded(tiny_job):
    from orchestrator.layouts import build_run_plan
    from orchestrator.planner.evaluate import mesh_problem
    from orchestrator.planner.types import PlanRequest

    plan = build_run_plan(tiny_job("model.vocab_size=257", "parallel.tensor=2"))
    assert {layout.tp for layout in plan.layouts.values()} == {2}
    request = PlanRequest(model=CFG, gpus=2, global_batch=32, seq_len=128, gpu="h100")
    assert mesh_problem(request, 1, 2, 1) == ""  # the planner ranks tp=2 for vocab 257


def test_the_planner_counts_the_padded_embedding_rows():
    from orchestrator.planner.memory import stage_parameters

    padded = stage_parameters(CFG, 4, 1, 0) - stage_parameters(CFG.replace(vocab_size=260), 4, 1, 0)
    assert padded == 0  # 257 over tp=4 holds 260 rows, 65 per rank


@pytest.mark.slow
def test_tp2_training_with_vocab_257_matches_tp1_and_resumes_across_degrees(tmp_path):
    """DeepSpeed runs (fp32, 6 steps): tp=2 with the padded vocabulary gives the tp=1 losses; its
    consolidated checkpoint holds the 257 real rows; a tp=2 run resumed from it (re-padding on
    load) ends at the tp=1 run's final parameters."""
    from tests.harness.parity import ParityRun, parity_layout, run_parity
    from workers.parallel.reshard import read_consolidated

    model, steps = {"vocab_size": 257}, 6
    ref_dir, tp_dir, resumed_dir = (tmp_path / n for n in ("ref", "tp2", "resumed"))
    ref = run_parity(ParityRun(steps=steps, model=model, save_at=steps, save_dir=str(ref_dir)))
    tp2 = parity_layout(1, 2, 1)
    first = run_parity(ParityRun(tp2, steps=steps, model=model, save_at=3, save_dir=str(tp_dir)))
    _, saved = read_consolidated(tp_dir / "step_3")
    assert saved["param"]["tok_emb.weight"].shape == (257, CFG.d_model)
    resumed = run_parity(
        ParityRun(
            tp2,
            steps=steps,
            model=model,
            resume_from=str(tp_dir / "step_3"),
            save_at=steps,
            save_dir=str(resumed_dir),
        )
    )
    assert first["losses"] == pytest.approx(ref["losses"], rel=1e-4)
    assert resumed["losses"] == pytest.approx(ref["losses"][3:], rel=1e-4)
    _, final = read_consolidated(resumed_dir / f"step_{steps}")
    _, expected = read_consolidated(ref_dir / f"step_{steps}")
    for name, value in expected["param"].items():
        torch.testing.assert_close(final["param"][name], value, rtol=1e-4, atol=1e-5)
