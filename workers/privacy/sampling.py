"""Poisson sampling of each optimizer step's training sequences.

Step ``s`` includes each of the N training sequences independently with probability
``q = expected_batch / N`` (Poisson subsampling, the sampling that the RDP and PRV analyses of the
subsampled Gaussian mechanism assume: Abadi et al. 2016, Sec. 3.1; Mironov, Talwar & Zhang 2019).
The draw is a function of ``(seed, step)`` only, so every data-parallel rank sees the same set
(each then takes its own contiguous share) and a resumed run draws the same sets again.
"""

from __future__ import annotations

import numpy as np


def poisson_sample(seed: int, step: int, n_sequences: int, sample_rate: float) -> np.ndarray:
    """Indices (sorted, int64) of the sequences that step ``step`` includes.

    Example:
        >>> idx = poisson_sample(0, 3, 100_000, 0.001)
        >>> 60 < len(idx) < 140, bool((idx == poisson_sample(0, 3, 100_000, 0.001)).all())
        (True, True)
    """
    rng = np.random.default_rng([seed, step, 0x0D9])
    return np.flatnonzero(rng.random(n_sequences) < sample_rate).astype(np.int64)


def rank_share(indices: np.ndarray, dp_rank: int, dp: int) -> np.ndarray:
    """Data-parallel rank ``dp_rank``'s contiguous share of ``indices`` (sizes differ by at most 1)."""
    return np.array_split(indices, dp)[dp_rank]
