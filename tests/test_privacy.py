"""DP-SGD pieces that need no process group: per-sequence gradients and clipping against a
per-example loop, the accountant against Opacus', Poisson sampling, and the refusals before
launch (config, delta, layouts, budget)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from mla.config import ModelConfig
from orchestrator.config import load_job_config
from orchestrator.contract.deepspeed_config import build_deepspeed_config
from orchestrator.contract.errors import ConfigError, PlanError
from orchestrator.contract.layout import Layout
from orchestrator.privacy import check_budget, plan_privacy, privacy_layout_reason
from orchestrator.progress import format_progress
from workers.parallel.pipeline import SequentialLM, VocabParallelLoss, layer_specs
from workers.privacy.accounting import (
    PrivacyPlan,
    add_steps,
    affordable_steps,
    calibrate_noise,
    spent_epsilon,
)
from workers.privacy.dpsgd import clip_and_sum, per_sequence_gradients
from workers.privacy.sampling import poisson_sample, rank_share

SMALL = ModelConfig(
    vocab_size=256,
    d_model=32,
    n_layers=2,
    n_heads=2,
    ffn_hidden=64,
    max_seq_len=32,
    local_window=4,
    global_k=2,
    block_size=4,
)


def tiny(*overrides):
    return load_job_config("configs/tiny.yaml", list(overrides))


def small_lm(seed: int = 0) -> SequentialLM:
    """The workers' pp == 1 model (tied head, MLA attention) without a process group (tp == 1)."""
    groups = SimpleNamespace(tp_rank=0, tp_group=None, layout=Layout())
    specs = layer_specs(SMALL, groups, seed, "none")
    return SequentialLM(
        [s.build() for s in specs[:-1]], VocabParallelLoss(groups, SMALL.vocab_size)
    )


def loop_gradients(model, x, y) -> list[dict[str, torch.Tensor]]:
    out = []
    for i in range(len(x)):
        model.zero_grad()
        model(x[i : i + 1], y[i : i + 1]).backward()
        out.append({n: p.grad.clone() for n, p in model.named_parameters()})
    return out


def test_per_sequence_gradients_equal_a_per_example_loop(one_torch_thread):
    model = small_lm()
    x, y = torch.randint(0, 256, (5, 16)), torch.randint(0, 256, (5, 16))
    grads, losses = per_sequence_gradients(model, x, y)
    for i, ref in enumerate(loop_gradients(model, x, y)):
        for name, g in ref.items():
            torch.testing.assert_close(grads[name][i], g, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(losses[i], model(x[i : i + 1], y[i : i + 1]).detach())
    assert "layers.0.weight" in grads  # the tied embedding/head weight gets both contributions


def test_each_sequence_is_clipped_to_max_grad_norm(one_torch_thread):
    model = small_lm(seed=3)
    x, y = torch.randint(0, 256, (6, 16)), torch.randint(0, 256, (6, 16))
    loop = loop_gradients(model, x, y)
    norms = [math.sqrt(sum(float(g.pow(2).sum()) for g in ref.values())) for ref in loop]
    clip = float(np.median(norms))  # half the sequences are clipped, half are not
    summed, got_norms = clip_and_sum(per_sequence_gradients(model, x, y)[0], clip)
    torch.testing.assert_close(got_norms, torch.tensor(norms), rtol=1e-4, atol=0)
    factors = [min(1.0, clip / (n + 1e-6)) for n in norms]
    for name in summed:
        expected = sum(f * ref[name] for f, ref in zip(factors, loop, strict=True))
        torch.testing.assert_close(summed[name], expected, rtol=1e-4, atol=1e-6)
    clipped_norms = [f * n for f, n in zip(factors, norms, strict=True)]
    assert max(clipped_norms) <= clip * (1 + 1e-6) and sum(n > clip for n in norms) >= 2


def test_no_clipping_sums_the_plain_gradients(one_torch_thread):
    model = small_lm()
    x, y = torch.randint(0, 256, (4, 16)), torch.randint(0, 256, (4, 16))
    summed, _ = clip_and_sum(per_sequence_gradients(model, x, y)[0], math.inf)
    model.zero_grad()
    (model(x, y) * len(x)).backward()  # mean token loss of equal-length sequences, times the batch
    for name, p in model.named_parameters():
        torch.testing.assert_close(summed[name], p.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", ["rdp", "prv"])
def test_reported_epsilon_equals_opacus_accountant_stepped_one_step_at_a_time(kind):
    from opacus.accountants import create_accountant

    reference = create_accountant(kind)
    history: list = []
    for sigma, steps in ((1.1, 40), (0.9, 25)):  # e.g. a resume with another noise multiplier
        for _ in range(steps):
            reference.step(noise_multiplier=sigma, sample_rate=0.01)
            history = add_steps(history, sigma, 0.01, 1)
    assert history == [(1.1, 0.01, 40), (0.9, 0.01, 25)]
    assert spent_epsilon(kind, history, 1e-5) == pytest.approx(
        reference.get_epsilon(delta=1e-5), rel=1e-9
    )
    assert (
        spent_epsilon(kind, [], 1e-5) == 0.0
        and spent_epsilon(kind, [(0.0, 0.01, 1)], 1e-5) == math.inf
    )


def test_calibrated_noise_spends_the_target_and_affordable_steps_is_the_last_that_fits():
    sigma = calibrate_noise(8.0, 1e-5, 0.01, 300, "rdp")
    assert 7.9 < spent_epsilon("rdp", [(sigma, 0.01, 300)], 1e-5) <= 8.0
    afford = affordable_steps("rdp", [], 0.7, 0.01, 1e-5, 3.0, 0, 10_000)
    assert (
        spent_epsilon("rdp", [(0.7, 0.01, afford)], 1e-5)
        <= 3.0
        < spent_epsilon("rdp", [(0.7, 0.01, afford + 1)], 1e-5)
    )


def test_poisson_sampling_is_seeded_by_step_and_rank_shares_partition_it():
    draws = [len(poisson_sample(7, s, 20_000, 0.01)) for s in range(200)]
    assert (
        abs(np.mean(draws) - 200) < 5 and 10 < np.std(draws) < 18
    )  # Binomial(20000, 0.01): sd 14.1
    a, b = poisson_sample(7, 3, 20_000, 0.01), poisson_sample(7, 3, 20_000, 0.01)
    assert (a == b).all() and not np.array_equal(a, poisson_sample(7, 4, 20_000, 0.01))
    shares = [rank_share(a, r, 3) for r in range(3)]
    assert (np.concatenate(shares) == a).all()


def test_privacy_config_errors_name_the_field_and_the_fix():
    with pytest.raises(ConfigError, match=r"target_epsilon\(0.0\) must be > 0"):
        tiny("train.privacy.target_epsilon=0")
    with pytest.raises(ConfigError, match=r"target_epsilon\(-1.0\) must be > 0"):
        tiny("train.privacy.target_epsilon=-1")
    with pytest.raises(ConfigError, match="needs target_epsilon or noise_multiplier"):
        tiny("train.privacy.max_grad_norm=1")
    with pytest.raises(ConfigError, match="unknown key 'epsilon'"):
        tiny("train.privacy.epsilon=8")


def test_delta_must_be_below_one_over_n():
    job = tiny(
        "parallel.zero_stage=1", "train.privacy.target_epsilon=8", "train.privacy.delta=0.005"
    )
    with pytest.raises(PlanError, match=r"delta\(0.005\) >= 1/N = 0.002 for N=500"):
        plan_privacy(job, 500, [Layout(dp=2, zero_stage=1, micro_batch=8, grad_accum=2)])
    plan = plan_privacy(
        job.model_copy(
            update={
                "train": job.train.model_copy(
                    update={"privacy": job.train.privacy.model_copy(update={"delta": None})}
                )
            }
        ),
        500,
        [Layout(dp=2, zero_stage=1, micro_batch=8, grad_accum=2)],
    )
    assert plan.delta == 1 / 1000 and plan.sample_rate == 32 / 500


@pytest.mark.parametrize(
    "layout, fix",
    [
        (Layout(dp=1, tp=2, micro_batch=8, grad_accum=4), "parallel.tensor=1"),
        (Layout(dp=1, pp=2, zero_stage=1, micro_batch=8, grad_accum=4), "parallel.pipeline=1"),
        (Layout(dp=2, zero_stage=2, micro_batch=8, grad_accum=2), "parallel.zero_stage=1"),
        (
            Layout(dp=2, zero_stage=1, micro_batch=8, grad_accum=2, recompute="full"),
            "parallel.recompute=none",
        ),
    ],
)
def test_layouts_dp_sgd_cannot_run_are_refused_with_the_reason(layout, fix):
    assert fix in privacy_layout_reason(layout)
    with pytest.raises(PlanError, match=f"cannot run under {layout.describe()}.*{fix}"):
        plan_privacy(tiny("train.privacy.target_epsilon=8"), 100_000, [layout])
    assert privacy_layout_reason(Layout(dp=4, zero_stage=1)) is None
    assert privacy_layout_reason(Layout(dp=4, zero_stage=0)) is None


def test_a_run_over_budget_is_refused_with_the_steps_it_can_afford():
    job = tiny(
        "parallel.zero_stage=1",
        "train.steps=2000",
        "train.privacy.target_epsilon=2",
        "train.privacy.noise_multiplier=0.6",
    )
    layout = [Layout(dp=2, zero_stage=1, micro_batch=8, grad_accum=2)]
    with pytest.raises(PlanError, match=r"over target_epsilon\(2\).*affords (\d+) steps") as err:
        plan_privacy(job, 10_000, layout)
    afford = int(str(err.value).split("affords ")[1].split()[0])
    q, delta = 32 / 10_000, 1 / 20_000
    assert (
        spent_epsilon("rdp", [(0.6, q, afford)], delta)
        <= 2
        < spent_epsilon("rdp", [(0.6, q, afford + 1)], delta)
    )
    plan = plan_privacy(
        tiny("parallel.zero_stage=1", "train.steps=2000", "train.privacy.target_epsilon=2"),
        10_000,
        layout,
    )
    assert check_budget(plan, [], 0, 2000) <= 2  # calibrated noise fits
    with pytest.raises(
        PlanError, match="resuming at step 1000"
    ):  # the first 1000 steps spent it already
        check_budget(plan, [(plan.noise_multiplier, q, 2000)], 1000, 2000)


def test_resuming_a_non_private_checkpoint_privately_is_refused(tmp_path):
    job = tiny("parallel.zero_stage=1", "train.privacy.target_epsilon=8", f"run.dir={tmp_path}")
    with pytest.raises(PlanError, match="trained without privacy"):
        plan_privacy(
            job, 10_000, [Layout(dp=2, zero_stage=1, micro_batch=8, grad_accum=2)], (50, None)
        )


def test_deepspeed_clipping_is_off_and_progress_shows_epsilon():
    job = tiny("parallel.zero_stage=1", "train.privacy.target_epsilon=8")
    assert (
        build_deepspeed_config(job, Layout(dp=2, zero_stage=1, micro_batch=8, grad_accum=2))[
            "gradient_clipping"
        ]
        == 0
    )
    assert (
        build_deepspeed_config(tiny(), Layout(dp=2, zero_stage=2, micro_batch=8, grad_accum=2))[
            "gradient_clipping"
        ]
        == 1
    )
    line = format_progress({"step": 50, "loss": 2.0, "val_loss": 1.9, "epsilon": 3.14159}, 300, 12)
    assert "eps 3.14" in line
    assert PrivacyPlan(
        **plan_privacy(
            job, 10_000, [Layout(dp=2, zero_stage=1, micro_batch=8, grad_accum=2)]
        ).to_dict()
    )
