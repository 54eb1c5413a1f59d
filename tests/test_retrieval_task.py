"""The passkey task of ``mla bench retrieval``: the planted pair is where it says, and the answer
is recoverable from the sequence alone."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.retrieval import RetrievalSettings, passkey_batch, region

S = RetrievalSettings(seq_len=40, n_filler=10, n_keys=3, n_values=5)


def _solve(tokens: np.ndarray) -> int:
    """Brute force: the token right after the first earlier occurrence of the last token."""
    first = int(np.flatnonzero(tokens[:-1] == tokens[-1])[0])
    return int(tokens[first + 1])


def test_planted_pair_sits_at_the_stated_distance():
    d = np.arange(1, S.seq_len - 1)
    b = passkey_batch(np.random.default_rng(0), S, d)
    rows = np.arange(len(d))
    assert b.tokens.shape == (len(d), S.seq_len)
    assert np.array_equal(b.value_pos, S.seq_len - 1 - d)
    assert np.array_equal(b.tokens[rows, b.value_pos], b.answers)
    assert np.array_equal(b.tokens[rows, b.value_pos - 1], b.tokens[:, -1])  # the key
    is_key = (b.tokens >= S.n_filler) & (b.tokens < S.n_filler + S.n_keys)
    is_value = b.tokens >= S.n_filler + S.n_keys
    assert (is_key.sum(1) == 2).all() and (is_value.sum(1) == 1).all()
    assert b.tokens.max() < S.vocab_size and b.tokens.min() >= 0


def test_answer_is_recoverable_and_covers_every_value():
    b = passkey_batch(np.random.default_rng(1), S, np.full(400, 7))
    assert [_solve(row) for row in b.tokens] == b.answers.tolist()
    assert set(b.answers.tolist()) == set(range(S.n_filler + S.n_keys, S.vocab_size))


def test_distances_outside_the_sequence_are_refused():
    rng = np.random.default_rng(2)
    for bad in (0, S.seq_len - 1):
        with pytest.raises(ValueError, match="distances must lie in"):
            passkey_batch(rng, S, np.array([bad]))


def test_regions_follow_the_window_and_the_receptive_field():
    s = RetrievalSettings(local_window=8, n_layers=2)
    assert s.receptive_field == 14
    assert [region(d, s) for d in (7, 8, 14, 15)] == [
        "window",
        "receptive field",
        "receptive field",
        "beyond",
    ]
