"""``PrivacyPlan``: the DP-SGD settings the driver hands to every worker (``train.privacy``).

Built by :func:`orchestrator.privacy.plan_privacy` before launch (noise calibrated, delta and
sampling rate derived from the corpus), carried by :class:`~orchestrator.contract.run_plan.RunPlan`
and run by :mod:`workers.privacy`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class PrivacyPlan:
    """DP-SGD settings of one run, as the workers use them.

    Attributes:
        noise_multiplier: sigma; the noise added to the *summed* clipped gradient of a step has
            standard deviation ``sigma * max_grad_norm`` per coordinate.
        max_grad_norm: Per-sequence clipping norm C (L2 over all parameters).
        sample_rate: Poisson sampling rate q = expected_batch / n_sequences.
        expected_batch: Expected sequences per step (``train.global_batch``); the noisy sum is
            divided by it.
        n_sequences: Training sequences N (windows of ``seq_len + 1`` tokens).
        delta: Privacy parameter delta (< 1 / N).
        accountant: ``"rdp"`` or ``"prv"``.
        target_epsilon: Budget for the run, or ``None`` when only the noise was given.
        sampling: ``"poisson"``.

    Example:
        >>> PrivacyPlan(1.1, 1.0, 32 / 10_000, 32, 10_000, 5e-5, "rdp").sample_rate
        0.0032
    """

    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    expected_batch: int
    n_sequences: int
    delta: float
    accountant: str
    target_epsilon: float | None = None
    sampling: str = "poisson"

    def to_dict(self) -> dict:
        """Plain-dict form (JSON, Ray's config)."""
        return dataclasses.asdict(self)
