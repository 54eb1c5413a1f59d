"""Early exit with the shared head: threshold 1.0 is the full model bit for bit (full sequence and
KV-cache decoding); lower thresholds use fewer layers; the exit loss trains the exits."""

import copy

import numpy as np
import pytest
import torch

from mla.compress.distill import distill, distillation_loss
from mla.compress.early_exit import (
    calibrate_threshold,
    check_exits,
    decode_step_early_exit,
    early_exit_forward,
    early_exit_loss,
    exit_logits,
    generate_early_exit,
)
from mla.decoding import decode_step, prefill
from mla.generate import generate
from mla.sampling import SamplingConfig
from tests.compress_fixture import corpus_windows, train_tiny, val_batch

GREEDY = SamplingConfig(temperature=0.0)
PROMPTS = [list(b"def main():\n    "), list(b"import os\nimport ")]


@pytest.fixture(scope="module", params=["mla", "dense"])
def model(request):
    torch.set_num_threads(1)
    return train_tiny(steps=100, n_layers=3, attention=request.param)


def test_threshold_one_reproduces_the_full_sequence_model(model):
    x, _ = val_batch(2)
    logits, stats = early_exit_forward(model, x, [1, 2], 1.0)
    with torch.no_grad():
        want = model(x)
        assert torch.equal(exit_logits(model, x, [1, 2])[-1], want)
    assert torch.equal(logits, want)
    assert stats.mean_layers == 3 and stats.compute_saved == 0


def test_threshold_one_reproduces_kv_cache_decoding_exactly(model):
    toks, stats = generate_early_exit(model, PROMPTS, 12, GREEDY, [1, 2], 1.0)
    assert toks == generate(model, PROMPTS, 12, GREEDY)
    assert stats.layers.tolist() == [3] * (2 * 12)
    padded = torch.zeros(2, 20, dtype=torch.long)
    for i, p in enumerate(PROMPTS):
        padded[i, : len(p)] = torch.tensor(p)
    lengths = [len(p) for p in PROMPTS]
    a, _ = prefill(model, padded, lengths)
    b, _ = prefill(model, padded, lengths)
    nxt = torch.tensor([65, 66])
    for _ in range(5):
        want = decode_step(model, nxt, a)
        got, layers = decode_step_early_exit(model, nxt, b, [1, 2], 1.0)
        assert torch.equal(got, want) and layers.tolist() == [3, 3]
        nxt = want.argmax(-1)


def test_lower_thresholds_exit_earlier(model):
    x, _ = val_batch(4)
    fwd = [early_exit_forward(model, x, [1, 2], t)[1].mean_layers for t in (1.0, 0.9, 0.5, 1e-6)]
    gen = [
        generate_early_exit(model, PROMPTS, 16, GREEDY, [1, 2], t)[1].mean_layers
        for t in (1.0, 0.9, 0.5, 1e-6)
    ]
    for used in (fwd, gen):
        assert all(a >= b for a, b in zip(used, used[1:], strict=False)), used
        assert used[0] == 3 and used[-1] < 3
    assert fwd[-1] == 1  # every max probability >= 1e-6: every token leaves at the first exit
    first = 3 * 2  # the first new token of each row comes from the full prefill
    assert gen[-1] == pytest.approx((first + 1 * 2 * 15) / (2 * 16))


def test_an_exited_token_gets_the_exit_layers_logits(model):
    prompt = torch.tensor([PROMPTS[0]])
    state, logits = prefill(model, prompt)
    nxt = logits[:, -1].argmax(-1)
    got, layers = decode_step_early_exit(model, nxt, state, [1], 1e-6)
    assert layers.tolist() == [1]
    with torch.no_grad():
        want = exit_logits(model, torch.cat([prompt, nxt.view(1, 1)], 1), [1])[0][:, -1]
    assert (got - want).abs().max() < 1e-4
    assert state.lengths == [len(PROMPTS[0]) + 1]
    # the skipped layers' caches hold the new position: decoding goes on
    decode_step_early_exit(model, got.argmax(-1), state, [1], 1e-6)
    assert state.lengths == [len(PROMPTS[0]) + 2]


def test_exit_loss_trains_the_early_exit(model):
    teacher = model
    student = copy.deepcopy(model)
    train, _ = corpus_windows(64)
    batches = (
        tuple(torch.from_numpy(a) for a in train.windows(np.arange(i * 4, i * 4 + 4)))
        for i in range(10_000)
    )
    x, _ = val_batch(4)

    def exit_kl(m):
        with torch.no_grad():
            return float(distillation_loss(exit_logits(m, x, [1])[0], teacher(x)))

    before = exit_kl(student)
    distill(student, teacher, batches, 30, lr=3e-3, loss_fn=early_exit_loss([1]))
    assert exit_kl(student) < 0.8 * before


@pytest.mark.parametrize(
    ("exits", "threshold", "message"),
    [
        ([], 0.9, "exits is empty"),
        ([0], 0.9, "strictly increasing layers in \\[1, 2\\]"),
        ([3], 0.9, "an exit after the last is the full model"),
        ([2, 1], 0.9, "strictly increasing"),
        ([1], 0.0, "threshold=0.0 must be in \\(0, 1\\]"),
        ([1], 1.5, "threshold=1.5"),
    ],
)
def test_bad_exits_are_refused(exits, threshold, message):
    with pytest.raises(ValueError, match=message):
        check_exits(3, exits, threshold)


def test_calibration_picks_the_lowest_threshold_within_the_tolerance(model):
    x, y = val_batch(4)
    batches = [(x[:2], y[:2]), (x[2:], y[2:])]
    strict, rows = calibrate_threshold(model, batches, [1, 2], 0.0)
    loose, same = calibrate_threshold(model, batches, [1, 2], 10.0)
    assert rows == same and rows[0]["threshold"] == 1.0 and rows[0]["loss_increase"] == 0
    assert loose == min(r["threshold"] for r in rows)  # a 10-nat tolerance admits every point
    assert next(r for r in rows if r["threshold"] == strict)["loss_increase"] <= 0
    mid = sorted(r["loss_increase"] for r in rows)[len(rows) // 2]
    chosen, _ = calibrate_threshold(model, batches, [1, 2], mid)
    ok = [r for r in rows if r["loss_increase"] <= mid]
    assert chosen == min(r["threshold"] for r in ok)
    # the routed loss at the chosen threshold is the one early_exit_forward gives
    row = next(r for r in rows if r["threshold"] == chosen)
    logits, stats = early_exit_forward(model, x, [1, 2], chosen)
    ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())
    assert float(ce) == pytest.approx(row["val_loss"], rel=1e-5)
    assert stats.mean_layers == pytest.approx(row["mean_layers"])
    with pytest.raises(ValueError, match="tolerance=-1 must be >= 0"):
        calibrate_threshold(model, batches, [1, 2], -1)
