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
    # figures["resumed_minus_newest_checkpoint"] (per kill: resumed-from step minus the newest
    # complete checkpoint sampled at the kill) is reported by benchmarks/faults.py but not asserted:
    # on 2026-12-01 it held a None or negative entry in a run whose losses and tensors were
    # identical, so the sampling itself is still to be checked (issue 13).
