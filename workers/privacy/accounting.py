"""The privacy accountant (Opacus' RDP and PRV accountants) of a DP-SGD run.

The plan (:class:`~orchestrator.contract.privacy.PrivacyPlan`) is built by the controller
(:func:`orchestrator.privacy.plan_privacy`) and shipped to every worker in the ``RunPlan``. The
accountant state is a *history* of ``(noise_multiplier,
sample_rate, steps)`` triples, Opacus' own representation (``IAccountant.history``): it is
JSON-friendly, goes into every checkpoint's ``meta.json`` and composes correctly when a resumed
run changes the noise or the batch.

Pure Python at import time (Opacus, which imports torch, is imported inside functions), so the
controller can use this module.
"""

from __future__ import annotations

import math

from orchestrator.contract.privacy import PrivacyPlan

__all__ = [
    "ACCOUNTANTS",
    "PrivacyPlan",
    "add_steps",
    "affordable_steps",
    "build_accountant",
    "calibrate_noise",
    "spent_epsilon",
]

ACCOUNTANTS = ("rdp", "prv")


History = list[tuple[float, float, int]]


def add_steps(history: History, noise_multiplier: float, sample_rate: float, steps: int) -> History:
    """``history`` with ``steps`` more steps at ``(noise_multiplier, sample_rate)`` (merged into
    the last entry when it has the same settings, as Opacus' ``RDPAccountant.step`` does)."""
    out: History = [(float(s), float(q), int(n)) for s, q, n in history]
    if steps <= 0:
        return out
    if out and out[-1][0] == noise_multiplier and out[-1][1] == sample_rate:
        out[-1] = (noise_multiplier, sample_rate, out[-1][2] + steps)
    else:
        out.append((noise_multiplier, sample_rate, steps))
    return out


def build_accountant(kind: str, history: History):
    """An Opacus accountant (``RDPAccountant`` or ``PRVAccountant``) holding ``history``.

    Raises:
        ValueError: ``kind`` is not ``rdp`` or ``prv``.
    """
    from opacus.accountants import create_accountant

    if kind not in ACCOUNTANTS:
        raise ValueError(f"accountant {kind!r} must be one of {', '.join(ACCOUNTANTS)}")
    accountant = create_accountant(kind)
    accountant.history = [(float(s), float(q), int(n)) for s, q, n in history]
    return accountant


def spent_epsilon(kind: str, history: History, delta: float) -> float:
    """Epsilon spent by ``history`` at ``delta`` (0 for no steps, inf when a step had no noise).

    RDP: Mironov 2017 (RDP of the subsampled Gaussian, Mironov, Talwar & Zhang 2019), converted
    to (epsilon, delta) as in Opacus ``RDPAccountant.get_epsilon``. PRV: Gopi, Lee & Wutschitz
    2021, Opacus ``PRVAccountant.get_epsilon`` (its default eps_error 0.01).
    """
    history = [h for h in history if h[2] > 0]
    if not history:
        return 0.0
    if any(s == 0 for s, _, _ in history):
        return math.inf
    return float(build_accountant(kind, history).get_epsilon(delta=delta))


def calibrate_noise(
    target_epsilon: float, delta: float, sample_rate: float, steps: int, kind: str
) -> float:
    """The smallest noise multiplier that spends at most ``target_epsilon`` in ``steps`` steps
    (Opacus ``get_noise_multiplier``, bisection to its default tolerance 0.01 in epsilon)."""
    from opacus.accountants.utils import get_noise_multiplier

    return float(
        get_noise_multiplier(
            target_epsilon=target_epsilon,
            target_delta=delta,
            sample_rate=sample_rate,
            steps=steps,
            accountant=kind,
        )
    )


def affordable_steps(
    kind: str,
    prior: History,
    noise_multiplier: float,
    sample_rate: float,
    delta: float,
    target_epsilon: float,
    start: int,
    max_steps: int,
) -> int:
    """The last step ``T`` in ``[start, max_steps]`` such that ``prior`` plus ``T - start`` steps
    at ``(noise_multiplier, sample_rate)`` spends at most ``target_epsilon`` (bisection; epsilon
    grows with the number of steps). Returns ``start`` when even one more step is too many."""

    def fits(t: int) -> bool:
        spent = spent_epsilon(
            kind, add_steps(prior, noise_multiplier, sample_rate, t - start), delta
        )
        return spent <= target_epsilon

    lo, hi = start, max_steps
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo
