"""Fault injection: three SIGKILLs of random workers (at random moments and during checkpoint
writes) in one run; per-step losses and final tensors equal an uninterrupted run's, and every
restart resumes from the newest complete checkpoint at its kill (``benchmarks/faults.py``)."""

from __future__ import annotations

import pytest

from benchmarks.faults import soak

pytestmark = pytest.mark.slow


def test_three_kills_change_no_loss_and_no_parameter(tmp_path):
    figures = soak(tmp_path, kills=3, steps=40, every=5, seed=1, timeout_s=900)
    assert figures["kills"] == 3
    assert figures["missing_steps"] == [] and figures["steps_compared"] == 40
    assert figures["max_loss_difference"] == 0.0
    assert figures["max_final_tensor_difference"] == 0.0
    # every restart resumed from the newest complete checkpoint at its kill, or a newer one
    # that completed between the sample and the SIGKILL (benchmarks.faults.pair_restarts)
    assert all(
        lost is not None and lost >= 0 for lost in figures["resumed_minus_newest_checkpoint"]
    )
