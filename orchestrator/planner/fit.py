"""Fit the cost model's free constants on measured sweeps, and validate by leaving groups out.

The constants (:class:`.constants.CostConstants`) are chosen on a grid, never per run:

* memory (``activation_scale``, ``loss_bytes_per_logit``, ``transient_layers``,
  ``usable_memory_fraction``): the grid point with the most runs whose OOM outcome the model
  predicts (ties: the earliest, i.e. smallest, point);
* ``tp_link_fraction``: the grid point with the smallest squared log error of the step time
  after each group's own median ratio is removed (the ranking within a group does not depend on
  the overall efficiency, which stays fitted on the published layouts, :mod:`.calibrate`).

:func:`leave_one_group_out` refits on all groups but one and scores that one: OOM accuracy,
Spearman's rank correlation of predicted and measured throughput among the runs that fit, and
the top-pick regret (measured step time of the run the model ranks first among those it predicts
to fit, over the best measured, minus 1; a pick that ran out of memory counts as infinite).
Spearman (1904): Pearson correlation of the ranks, ties averaged (``scipy.stats.spearmanr``).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

from orchestrator.planner.constants import CALIBRATED, CostConstants
from orchestrator.planner.evaluate import estimate
from orchestrator.planner.kernels import get_kernel
from orchestrator.planner.memory import (
    activation_bytes_per_layer,
    buffer_bytes,
    model_state_bytes,
    stage_activation_bytes,
    stage_parameters,
)

ACTIVATION_SCALES = (1.0, 1.1, 1.2, 1.3, 1.4, 1.5)
LOSS_BYTES = (0.0, 16.0, 32.0, 48.0, 56.0, 64.0)
TRANSIENT_LAYERS = (0.0, 2.0, 4.0, 6.0, 8.0)
USABLE_FRACTIONS = (0.925, 0.95, 0.975, 1.0)
TP_LINK_FRACTIONS = (0.05, 0.075, 0.1, 0.125, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.7, 1.0)


def memory_terms(run) -> list[tuple[float, float, float, float]]:
    """Per checked stage (first, last): ``(fixed, activations, one_layer, logits)`` bytes such that
    :func:`.memory.stage_memory` with constants = ``fixed + a·activations + t·one_layer + c·logits``.

    Example: a pp=1 run has one stage, the first, which is also the last (logits non-zero).
    """
    q, lay = run.request, run.layout
    kernel = get_kernel(q.kernel)
    out = []
    for stage in sorted({0, lay.pp - 1}):
        psi = stage_parameters(q.model, lay.tp, lay.pp, stage)
        fixed = sum(model_state_bytes(psi, lay.zero_stage, lay.dp, q.precision, q.fp32_main_grads))
        fixed += buffer_bytes(q.model, psi, lay, q.precision)
        act = stage_activation_bytes(
            q.model, q.seq_len, lay, stage, q.flash_attention, kernel.norm_activation_bytes
        )
        layer = activation_bytes_per_layer(
            q.model,
            q.seq_len,
            lay.micro_batch,
            lay.tp,
            sequence_parallel=lay.sequence_parallel,
            flash=q.flash_attention,
            norm_bytes=kernel.norm_activation_bytes,
        )
        last = stage == lay.pp - 1 and not q.fused_loss
        logits = q.seq_len * lay.micro_batch * q.model.vocab_size if last else 0.0
        out.append((fixed, act, layer, logits))
    return out


def memory_grid() -> list[tuple[float, float, float, float]]:
    """``(activation_scale, loss_bytes, transient_layers, usable_fraction)`` points, smallest first."""
    return list(
        itertools.product(ACTIVATION_SCALES, LOSS_BYTES, TRANSIENT_LAYERS, USABLE_FRACTIONS)
    )


def oom_predictions(runs: list, grid: list) -> list[list[bool]]:
    """``[point][run]``: predicted OOM of each run at each grid point (uses :func:`memory_terms`)."""
    terms = [memory_terms(r) for r in runs]
    limits = [r.request.gpu_spec.memory_gib * 2**30 for r in runs]
    out = []
    for a, c, t, u in grid:
        out.append(
            [
                max(f + a * act + t * lay + c * lg for f, act, lay, lg in ts) > u * lim
                for ts, lim in zip(terms, limits, strict=False)
            ]
        )
    return out


def best_memory_point(runs: list, grid: list, predictions: list, keep: list[bool]) -> tuple:
    """Grid point with the most correct OOM predictions over the runs where ``keep`` is True."""

    def score(i: int) -> int:
        return sum(p == r.oom for p, r, k in zip(predictions[i], runs, keep, strict=False) if k)

    return grid[max(range(len(grid)), key=lambda i: (score(i), -i))]


def step_times(runs: list, constants: CostConstants) -> list[float]:
    """Predicted step times of ``runs`` (seconds) under ``constants``."""
    return [estimate(r.request.replace(constants=constants), r.layout).step_time_s for r in runs]


def demeaned_log_errors(runs: list, predicted: list[float]) -> list[float]:
    """``log(measured/predicted)`` of measured runs minus their group's median of the same."""
    by_group: dict[str, list[float]] = {}
    for r, p in zip(runs, predicted, strict=False):
        by_group.setdefault(r.group, []).append(math.log(r.step_time_s / p))
    med = {g: _median(v) for g, v in by_group.items()}
    return [
        math.log(r.step_time_s / p) - med[r.group] for r, p in zip(runs, predicted, strict=False)
    ]


def best_link_fraction(runs: list, base: CostConstants) -> float:
    """``tp_link_fraction`` minimising the squared demeaned log error over measured ``runs``."""
    measured = [r for r in runs if not r.oom]

    def loss(f: float) -> float:
        return sum(
            e * e
            for e in demeaned_log_errors(
                measured, step_times(measured, base.replace(tp_link_fraction=f))
            )
        )

    return min(TP_LINK_FRACTIONS, key=loss)


def fit_constants(
    runs: list,
    keep: list[bool] | None = None,
    predictions: list | None = None,
    grid: list | None = None,
) -> CostConstants:
    """Constants fitted on the runs where ``keep`` is True (all by default); see the module docstring."""
    keep = keep or [True] * len(runs)
    grid = grid or memory_grid()
    predictions = predictions or oom_predictions(runs, grid)
    a, c, t, u = best_memory_point(runs, grid, predictions, keep)
    base = CALIBRATED.replace(
        activation_scale=a, loss_bytes_per_logit=c, transient_layers=t, usable_memory_fraction=u
    )
    return base.replace(
        tp_link_fraction=best_link_fraction(
            [r for r, k in zip(runs, keep, strict=False) if k], base
        )
    )


@dataclass(frozen=True)
class GroupScore:
    """Held-out metrics of one sweep group (see the module docstring)."""

    group: str
    runs: int
    measured: int
    oom_accuracy: float
    spearman: float
    regret: float
    pick: str
    constants: CostConstants
    log_errors: tuple = ()


def score_group(runs: list, constants: CostConstants) -> GroupScore:
    """OOM accuracy, Spearman and top-pick regret of one group's ``runs`` under ``constants``."""
    from scipy.stats import spearmanr

    ests = [estimate(r.request.replace(constants=constants), r.layout) for r in runs]
    accuracy = sum((not e.fits) == r.oom for e, r in zip(ests, runs, strict=False)) / len(runs)
    fit = [(e.step_time_s, r.step_time_s) for e, r in zip(ests, runs, strict=False) if not r.oom]
    rho = (
        float(spearmanr([1 / p for p, _ in fit], [1 / m for _, m in fit]).statistic)
        if len(fit) > 2
        else math.nan
    )
    chosen = min(
        (i for i, e in enumerate(ests) if e.fits), key=lambda i: ests[i].step_time_s, default=None
    )
    best = min(m for _, m in fit)
    pick = runs[chosen] if chosen is not None else None
    regret = math.inf if pick is None or pick.oom else pick.step_time_s / best - 1
    text = f"{pick.layout.describe()} {pick.kernel}" if pick else "none predicted to fit"
    errors = tuple(math.log(m / p) for p, m in fit)
    return GroupScore(
        runs[0].group, len(runs), len(fit), accuracy, rho, regret, text, constants, errors
    )


def residual_band(scores: list[GroupScore], coverage: float = 0.8) -> tuple[float, float, float]:
    """``(low, high, relative)`` from held-out residuals ``log(measured/predicted)``.

    ``low``/``high``: the central ``coverage`` quantiles of all residuals (a predicted step time
    ``t`` is expected in ``[t·e^low, t·e^high]``); ``relative``: half the central ``coverage``
    width of the residuals minus their group's median, i.e. the error of a *comparison* of two
    layouts of one job (a common offset cancels).

    Example: residuals spread ±0.1 around a group offset of -0.05 → (-0.15, 0.05, 0.1).
    """
    every = sorted(e for s in scores for e in s.log_errors)
    centred = sorted(e - _median(list(s.log_errors)) for s in scores for e in s.log_errors)
    q = (1 - coverage) / 2

    def quantile(values: list[float], p: float) -> float:
        return values[min(len(values) - 1, max(0, round(p * (len(values) - 1))))]

    return (
        quantile(every, q),
        quantile(every, 1 - q),
        (quantile(centred, 1 - q) - quantile(centred, q)) / 2,
    )


def leave_one_group_out(runs: list) -> list[GroupScore]:
    """Refit on every group but one, score the one left out; one :class:`GroupScore` per group."""
    grid = memory_grid()
    predictions = oom_predictions(runs, grid)
    scores = []
    for group in dict.fromkeys(r.group for r in runs):
        keep = [r.group != group for r in runs]
        constants = fit_constants(runs, keep, predictions, grid)
        scores.append(score_group([r for r in runs if r.group == group], constants))
    return scores


def _median(values: list[float]) -> float:
    s = sorted(values)
    mid = len(s) // 2
    return s[mid] if len(s) % 2 else (s[mid - 1] + s[mid]) / 2
