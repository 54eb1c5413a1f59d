"""Divergence guard, lr schedule and strict JSON (the worker-side pieces of issue 13)."""

from __future__ import annotations

import json
import math

import pytest

from orchestrator.contract.strict_json import finite_or_none, strict_record
from workers.guard import Diverged, DivergenceGuard
from workers.schedule import lr_at


def test_guard_stops_after_max_bad_steps_in_a_row_and_names_step_values_and_fixes():
    guard = DivergenceGuard(max_bad_steps=3)
    guard.observe(1, 5.0, 1.0, 0)
    guard.observe(2, float("nan"), None, 0)
    guard.observe(3, 5.5, float("inf"), 0)
    with pytest.raises(Diverged) as err:
        guard.observe(4, 5.545, 2.0, 1)  # finite loss, but DeepSpeed skipped the step (lr=1e6 case)
    text = str(err.value)
    assert err.value.step == 4 and "from step 2" in text and "max_bad_steps=3" in text
    assert "loss nan" in text and "gradient norm inf" in text and "skipped" in text
    assert "lower train.lr" in text and "grad_clip" in text and "bf16" in text


def test_a_good_step_resets_the_count():
    guard = DivergenceGuard(max_bad_steps=2)
    for step in range(1, 20):
        guard.observe(step, float("nan") if step % 2 else 3.0, None, 0)
    assert guard.bad == 1


def test_first_step_runs_at_a_positive_lr_and_warmup_zero_means_peak_at_once():
    assert lr_at(1, 100, 3e-3, 3e-4, 20) == pytest.approx(3e-3 / 20)
    assert lr_at(20, 100, 3e-3, 3e-4, 20) == pytest.approx(3e-3)
    assert lr_at(1, 100, 3e-3, 3e-4, 0) == pytest.approx(3e-3, rel=1e-3)  # no warm-up: near peak
    assert lr_at(100, 100, 3e-3, 3e-4, 0) == pytest.approx(3e-4)
    assert lr_at(1, 1, 3e-3, 3e-4, 0) == pytest.approx(
        3e-4
    )  # one step: its end is the schedule's end
    lrs = [lr_at(s, 100, 3e-3, 3e-4, 20) for s in range(1, 101)]
    assert min(lrs) > 0 and all(a >= b for a, b in zip(lrs[19:], lrs[20:], strict=False))


def test_deepspeed_config_has_no_scheduler_that_would_run_step_one_at_lr_zero():
    from orchestrator.config import JobConfig
    from orchestrator.contract.deepspeed_config import build_deepspeed_config
    from orchestrator.contract.layout import Layout

    cfg = build_deepspeed_config(
        JobConfig(), Layout(dp=2, zero_stage=2, micro_batch=8, grad_accum=2)
    )
    assert "scheduler" not in cfg


def test_metrics_are_strict_json_with_non_finite_values_flagged():
    record = strict_record({"step": 3, "loss": float("nan"), "val_loss": float("inf"), "lr": 1e-3})
    assert record == {
        "step": 3,
        "loss": None,
        "val_loss": None,
        "lr": 1e-3,
        "nonfinite": ["loss", "val_loss"],
    }
    text = json.dumps(
        finite_or_none({"a": [1.0, -math.inf], "b": {"c": math.nan}}), allow_nan=False
    )
    json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict constant {c}"))


def test_atomic_json_writer_never_writes_nan(tmp_path):
    from workers.checkpoint import write_json_atomic

    write_json_atomic(tmp_path / "s.json", {"last_val_loss": float("nan")})
    assert json.loads((tmp_path / "s.json").read_text()) == {"last_val_loss": None}


def test_progress_line_prints_null_losses_and_the_divergence():
    from orchestrator.progress import format_progress

    line = format_progress({"step": 16, "loss": None, "lr": 8e5, "diverged": True}, 20, 3.0)
    assert "loss nan" in line and "DIVERGED" in line
