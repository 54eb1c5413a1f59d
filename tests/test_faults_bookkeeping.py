"""The fault soak's bookkeeping (``benchmarks/faults.py``): each kill is paired with the first
worker-group start written after it, a start from no checkpoint counts as step 0, and a kill
that causes two starts (a restart that failed at startup) does not shift later pairs."""

from __future__ import annotations

from benchmarks.faults import Kill, pair_restarts


def _start(step: int | None) -> dict:
    return {"event": "start", "resumed_from_step": step}


def test_kills_pair_with_the_first_start_after_them():
    kills = [Kill(0, "random", 0, 3, starts_before=1), Kill(1, "random", 10, 12, starts_before=3)]
    starts = [_start(None), _start(None), _start(None), _start(10)]  # kill 1 caused two starts
    pair_restarts(kills, starts)
    assert [k.resumed_from for k in kills] == [0, 10]
    assert [k.resumed_from - k.checkpoint_at_kill for k in kills] == [0, 0]


def test_a_kill_no_start_followed_stays_unpaired():
    kills = [Kill(0, "during checkpoint write", 5, 7, starts_before=2)]
    pair_restarts(kills, [_start(None), _start(5)])
    assert kills[0].resumed_from is None
