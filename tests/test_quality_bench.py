"""``mla bench quality``'s loss against position: buckets and per-position means."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from benchmarks.quality import (
    QualitySettings,
    bucket_means,
    evaluate,
    position_buckets,
    position_losses,
)
from mla.model import MLATransformer

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_buckets_double_from_the_window_to_the_context():
    assert position_buckets(1024, 64) == [(0, 64), (64, 128), (128, 256), (256, 512), (512, 1024)]
    assert position_buckets(100, 64) == [(0, 64), (64, 100)]
    assert position_buckets(32, 64) == [(0, 32)]


def test_bucket_means_average_the_positions_they_cover():
    losses = np.arange(10, dtype=float)
    assert bucket_means(losses, 4) == [
        {"start": 0, "end": 4, "loss": 1.5},
        {"start": 4, "end": 8, "loss": 5.5},
        {"start": 8, "end": 10, "loss": 8.5},
    ]


def test_position_losses_average_to_the_validation_loss():
    s = QualitySettings(
        d_model=32,
        n_heads=2,
        ffn_hidden=48,
        n_layers=1,
        train_seq_len=32,
        eval_contexts=(32,),
        local_window=8,
        global_k=8,
        block_size=8,
    )
    torch.manual_seed(0)
    model = MLATransformer(s.model_config("window"))
    tokens = np.random.default_rng(0).integers(0, 256, 32 * 20 + 1)
    per_pos = position_losses(model, tokens, 32, 32 * 20)
    assert per_pos.shape == (32,)
    assert evaluate(model, tokens, 32, 32 * 20) == pytest.approx(per_pos.mean(), rel=1e-12)


@pytest.mark.parametrize(
    "args, message",
    [
        (("quality", "--models", "mla,dense"), "--models='mla,dense' must start with dense"),
        (("quality", "--models", "dense,flash"), "name only dense, mla, window, sum"),
        (("retrieval", "--plot", "/no/such/folder/r.png"), "folder /no/such/folder does not"),
    ],
)
def test_bad_bench_options_exit_2_with_the_fix_and_no_traceback(mla_cli, args, message):
    result = mla_cli("bench", *args, timeout=120)
    assert result.returncode == 2
    assert message in " ".join(result.stderr.split())  # rich wraps long lines
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_models_trained_in_processes_score_as_one_after_the_other():
    from benchmarks.quality import run_quality

    s = QualitySettings(
        steps=2,
        batch=2,
        train_seq_len=64,
        eval_contexts=(64,),
        eval_tokens=256,
        threads=1,
        d_model=32,
        n_heads=2,
        ffn_hidden=64,
        n_layers=1,
        local_window=16,
        global_k=16,
        block_size=16,
    )
    serial, parallel = run_quality(s), run_quality(dataclasses.replace(s, processes=3))
    assert serial["results"] == parallel["results"]
    assert serial["results"][0]["val_loss_mla"] != serial["results"][0]["val_loss_window"]
