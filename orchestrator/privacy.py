"""Plan a differentially private run before launch (``train.privacy``).

:func:`plan_privacy` turns the job's ``train.privacy`` section into the
:class:`~workers.privacy.accounting.PrivacyPlan` the workers run, and refuses before anything
starts:

* a layout DP-SGD cannot run (:func:`privacy_layout_reason`);
* ``delta >= 1 / N`` (N training sequences): such a delta allows a mechanism that publishes a
  whole training sequence with probability delta per sequence (Dwork & Roth 2014, Sec. 2.3);
* a global batch larger than N (the sampling rate q = B / N would exceed 1);
* a run that would spend more than ``target_epsilon`` by ``train.steps`` (an explicit
  ``noise_multiplier`` too small, or a resume that changed the schedule): the message gives the
  number of steps the budget affords;
* resuming, privately, a checkpoint that was trained without privacy.

Sampling is Poisson with q = global_batch / N, as both accountants assume. With only
``target_epsilon`` the noise multiplier is calibrated by Opacus' ``get_noise_multiplier`` for
``train.steps`` steps; delta defaults to 1 / (2 N).

Torch-free at import (Opacus is imported by the accounting functions when called).
"""

from __future__ import annotations

import dataclasses

from orchestrator.config import JobConfig
from orchestrator.contract.checkpoints import latest_checkpoint, read_meta
from orchestrator.contract.errors import PlanError
from orchestrator.contract.layout import Layout
from orchestrator.contract.run_plan import RunPlan
from workers.privacy.accounting import (
    PrivacyPlan,
    add_steps,
    affordable_steps,
    calibrate_noise,
    spent_epsilon,
)


def privacy_layout_reason(layout: Layout) -> str | None:
    """Why DP-SGD cannot run ``layout``, or ``None``: it runs data parallel (any ``dp``) with
    ZeRO 0 or 1 under DeepSpeed, without activation recomputation.

    Example:
        >>> privacy_layout_reason(Layout(dp=2, zero_stage=1)) is None
        True
    """
    if layout.tp > 1:
        return (
            f"tensor parallel (tp={layout.tp}) splits each sequence's gradient over the tensor ranks and "
            "runs collectives inside the model, which the per-sequence gradient transform (torch.func "
            "vmap) cannot batch; set parallel.tensor=1"
        )
    if layout.pp > 1:
        return (
            f"pipeline parallel (pp={layout.pp}) computes gradients inside DeepSpeed's pipeline schedule, "
            "which gives no per-sequence gradients to clip; set parallel.pipeline=1"
        )
    if layout.zero_stage > 1:
        return (
            f"ZeRO-{layout.zero_stage} partitions gradients (and, at stage 3, the parameters that the "
            "per-sequence gradient pass needs whole), and DP-SGD is verified under ZeRO 0 and 1 only; "
            "set parallel.zero_stage=1"
        )
    if layout.recompute != "none":
        return (
            f"activation recomputation ({layout.recompute}) uses DeepSpeed's checkpoint function, which "
            "torch.func transforms cannot trace; set parallel.recompute=none"
        )
    return None


def prior_privacy(job: JobConfig) -> tuple[int, dict | None] | None:
    """``(step, privacy state)`` of the checkpoint a resume would load, or ``None`` (fresh run).
    The state is ``None`` when that checkpoint was trained without privacy."""
    found = latest_checkpoint(job.run_dir.resolve()) if job.checkpoint.resume else None
    if found is None:
        return None
    return found[0], read_meta(found[1]).get("privacy")


def plan_privacy(
    job: JobConfig,
    n_sequences: int,
    layouts: list[Layout],
    prior: tuple[int, dict | None] | None = None,
) -> PrivacyPlan | None:
    """The privacy plan of ``job`` (``None`` without ``train.privacy``).

    Args:
        job: The validated job.
        n_sequences: Training sequences N of the corpus.
        layouts: Every layout the run may use.
        prior: ``(step, privacy state)`` of the checkpoint being resumed (:func:`prior_privacy`).

    Raises:
        PlanError: one of the refusals listed in the module docstring (the message names the
            field, the numbers and the fix).
    """
    cfg = job.train.privacy
    if cfg is None:
        return None
    for layout in layouts:
        reason = privacy_layout_reason(layout)
        if reason:
            raise PlanError(f"train.privacy cannot run under {layout.describe()}: {reason}")
    batch = job.train.global_batch
    if batch > n_sequences:
        raise PlanError(
            f"train.privacy: train.global_batch({batch}) > the {n_sequences} training sequences; "
            "Poisson sampling needs global_batch <= N: lower train.global_batch or add data"
        )
    q = batch / n_sequences
    delta = cfg.delta if cfg.delta is not None else 1.0 / (2 * n_sequences)
    if delta >= 1.0 / n_sequences:
        raise PlanError(
            f"train.privacy.delta({cfg.delta:g}) >= 1/N = {1.0 / n_sequences:.3g} for N={n_sequences} "
            f"training sequences; set delta below 1/N (e.g. {1.0 / (10 * n_sequences):.1e}) or unset it "
            "for 1/(2N)"
        )
    start, history = _prior_history(job, prior)
    sigma = cfg.noise_multiplier
    if sigma is None and cfg.target_epsilon is not None:  # PrivacySection requires one of the two
        sigma = calibrate_noise(cfg.target_epsilon, delta, q, job.train.steps, cfg.accountant)
    if sigma is None:
        raise PlanError(
            "train.privacy needs target_epsilon or noise_multiplier; set train.privacy.target_epsilon=8"
        )
    plan = PrivacyPlan(
        noise_multiplier=sigma,
        max_grad_norm=cfg.max_grad_norm,
        sample_rate=q,
        expected_batch=batch,
        n_sequences=n_sequences,
        delta=delta,
        accountant=cfg.accountant,
        target_epsilon=cfg.target_epsilon,
    )
    check_budget(plan, history, start, job.train.steps)
    return plan


def _prior_history(job: JobConfig, prior: tuple[int, dict | None] | None) -> tuple[int, list]:
    if prior is None or prior[0] >= job.train.steps:
        return (prior[0], (prior[1] or {}).get("history", [])) if prior else (0, [])
    step, state = prior
    if state is None:
        raise PlanError(
            f"train.privacy: the checkpoint at step {step} of run {job.run.name!r} was trained "
            "without privacy, so its weights are not private; start a new run.name (or set "
            "checkpoint.resume=false)"
        )
    return step, [tuple(h) for h in state.get("history", [])]


def check_budget(plan: PrivacyPlan, history: list, start: int, steps: int) -> float:
    """Epsilon the run will have spent at ``steps``; refuse if it exceeds the target.

    Raises:
        PlanError: over ``target_epsilon``; says how many steps the budget affords.
    """
    remaining = max(0, steps - start)
    projected = spent_epsilon(
        plan.accountant,
        add_steps(history, plan.noise_multiplier, plan.sample_rate, remaining),
        plan.delta,
    )
    target = plan.target_epsilon
    if target is None or projected <= target:
        return projected
    afford = affordable_steps(
        plan.accountant,
        history,
        plan.noise_multiplier,
        plan.sample_rate,
        plan.delta,
        target,
        start,
        steps,
    )
    resumed = f" (resuming at step {start})" if start else ""
    head = (
        f"train.privacy: noise_multiplier {plan.noise_multiplier:.4g} at sampling rate {plan.sample_rate:.4g} "
        f"spends epsilon {projected:.3g} by train.steps={steps}{resumed}, over target_epsilon({target:g}) at "
        f"delta {plan.delta:.3g}; "
    )
    if afford <= start:
        raise PlanError(
            head + f"the budget affords no step after step {start}: raise "
            "train.privacy.noise_multiplier or target_epsilon"
        )
    raise PlanError(
        head + f"the budget affords {afford} steps: set train.steps={afford}, raise "
        "train.privacy.noise_multiplier, or raise target_epsilon"
    )


def training_sequences(job: JobConfig) -> int:
    """N: the training windows of ``data.seq_len + 1`` tokens (as :class:`workers.data.WindowBatches`
    counts them)."""
    from workers.data import load_corpus
    from workers.tokenizer_spec import job_tokenizer

    corpus = load_corpus(job.data.path, job.data.val_fraction, job_tokenizer(job))
    return (len(corpus.train) - 1) // job.data.seq_len


def attach_privacy(job: JobConfig, plan: RunPlan) -> RunPlan:
    """``plan`` with the run's :class:`PrivacyPlan` (unchanged without ``train.privacy``).

    Raises:
        PlanError: see :func:`plan_privacy`.
    """
    if job.train.privacy is None:
        return plan
    privacy = plan_privacy(
        job, training_sequences(job), list(plan.layouts.values()), prior_privacy(job)
    )
    return dataclasses.replace(plan, privacy=privacy)
