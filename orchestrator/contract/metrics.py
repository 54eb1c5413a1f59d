"""The training metrics the workers export to Prometheus, as data (torch- and Ray-free).

The workers (:mod:`workers.metrics`) create one ``ray.util.metrics`` object per entry of
:data:`METRICS`; the dashboard generator (:mod:`orchestrator.dashboards`) and its lint read the
same catalogue, so a panel can only query a metric that is exported. Ray's metrics agent adds
the ``ray_`` namespace to every custom metric, and exports a ``Counter`` only as
``<name>_total`` and a ``Histogram`` as ``<name>_{bucket,count,sum}`` (verified with Ray 2.60:
``../shared/anchors/observability/REPORT.md`` §1.2).

Labels reuse Ray Train V2's own tag names (``ray/train/v2/_internal/metrics/base.py``), so one
dashboard variable filters Ray's and the project's series alike; ``layout`` is a short string
(``dp2.tp1.pp1.z2``) that changes on an elastic re-plan. Step, head or token are never labels
(one series per value would be unbounded): per-step values stay in ``metrics.jsonl``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from orchestrator.contract.layout import Layout

RUN_LABEL = "ray_train_run_name"
"""Ray Train's run-name tag (= ``RunConfig.name`` = the run folder's name)."""
RANK_LABEL = "ray_train_worker_world_rank"
"""Ray Train's world-rank tag."""
LAYOUT_LABEL = "layout"
"""The parallel layout, e.g. ``dp2.tp1.pp1.z2`` (:func:`layout_label`)."""
LAYER_LABEL = "layer"
"""Transformer block index, for the per-layer gate."""

RAY_NAMESPACE = "ray_"
"""Prefix Ray's metrics agent puts on every custom metric."""

STEP_SECONDS_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 600.0)
"""Step-time histogram bucket bounds, seconds: a tiny CPU model (~0.1 s) to a large GPU step."""
CHECKPOINT_SECONDS_BUCKETS = (0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0)
"""Checkpoint-save histogram bucket bounds, seconds."""

Kind = Literal["gauge", "counter", "histogram"]


@dataclass(frozen=True)
class MetricSpec:
    """One exported metric.

    Attributes:
        name: Name given to ``ray.util.metrics`` (``mla_train_loss``); Prometheus shows it as
            :attr:`prometheus_names`.
        kind: ``gauge``, ``counter`` or ``histogram``.
        description: One line, with the unit.
        labels: Tag keys (besides the ones Ray adds: ``WorkerId``, ``SessionName``, ...).
        buckets: Histogram bucket upper bounds (histograms only).
    """

    name: str
    kind: Kind
    description: str
    labels: tuple[str, ...]
    buckets: tuple[float, ...] = ()

    @property
    def prometheus_names(self) -> tuple[str, ...]:
        """Series names as scraped: ``ray_mla_train_tokens_total`` for a counter, etc."""
        base = RAY_NAMESPACE + self.name
        if self.kind == "counter":
            return (base + "_total",)
        if self.kind == "histogram":
            return (base + "_bucket", base + "_count", base + "_sum")
        return (base,)


_RUN = (RUN_LABEL, LAYOUT_LABEL)
_RANK = (RUN_LABEL, RANK_LABEL, LAYOUT_LABEL)

METRICS: tuple[MetricSpec, ...] = (
    MetricSpec("mla_train_step", "gauge", "Optimizer step just finished, per rank.", _RANK),
    MetricSpec(
        "mla_train_total_steps", "gauge", "Steps the run trains in all (train.steps).", _RUN
    ),
    MetricSpec(
        "mla_train_loss", "gauge", "Training loss, mean over the logging window, nats/token.", _RUN
    ),
    MetricSpec(
        "mla_train_val_loss", "gauge", "Validation loss at the last evaluation, nats/token.", _RUN
    ),
    MetricSpec("mla_train_lr", "gauge", "Learning rate of the last step.", _RUN),
    MetricSpec("mla_train_grad_norm", "gauge", "Global gradient 2-norm of the last step.", _RUN),
    MetricSpec(
        "mla_train_tokens",
        "counter",
        "Tokens trained; each rank adds global tokens / world size, so sum() is the global count.",
        _RANK,
    ),
    MetricSpec(
        "mla_train_step_seconds",
        "histogram",
        "Wall time of one optimizer step on this rank, seconds (the straggler view).",
        _RANK,
        STEP_SECONDS_BUCKETS,
    ),
    MetricSpec(
        "mla_train_data_wait_seconds",
        "counter",
        "Seconds this rank spent fetching batches (inside the step time; DP-SGD runs: not counted).",
        _RANK,
    ),
    MetricSpec(
        "mla_train_mfu",
        "gauge",
        "Model FLOPs utilisation, 0-1: FLOPs/token x tokens/s / (peak FLOP/s x world size).",
        _RUN,
    ),
    MetricSpec(
        "mla_train_flops_per_token",
        "gauge",
        "Model training FLOPs per token (6N + attention, mla.flops), for derived MFU and TFLOP/s.",
        _RUN,
    ),
    MetricSpec(
        "mla_train_device_peak_flops",
        "gauge",
        "Dense peak FLOP/s of one worker's device at the training precision (planner catalogue).",
        _RUN,
    ),
    MetricSpec(
        "mla_train_device_memory_peak_bytes",
        "gauge",
        "Peak device memory of this rank over the logging window, bytes (CPU: peak RSS).",
        _RANK,
    ),
    MetricSpec(
        "mla_checkpoint_seconds",
        "histogram",
        "Wall time of one checkpoint save (all ranks, until the atomic rename), seconds.",
        _RUN,
        CHECKPOINT_SECONDS_BUCKETS,
    ),
    MetricSpec("mla_checkpoint_last_step", "gauge", "Step of the last complete checkpoint.", _RUN),
    MetricSpec(
        "mla_train_resumes",
        "gauge",
        "Starts of this run that resumed from a checkpoint so far (events.jsonl, this one included).",
        _RUN,
    ),
    MetricSpec("mla_train_world_size", "gauge", "Ray Train workers of the current attempt.", _RUN),
    MetricSpec(
        "mla_attention_gate_mean",
        "gauge",
        "Mean gate g of a layer at the last evaluation, 0-1 (share of the local branch).",
        (RUN_LABEL, LAYER_LABEL),
    ),
)
"""Every metric the workers export."""

BY_NAME = {spec.name: spec for spec in METRICS}


def exported_series_names() -> frozenset[str]:
    """Every Prometheus series name the workers produce (``ray_mla_*``)."""
    return frozenset(n for spec in METRICS for n in spec.prometheus_names)


def layout_label(layout: Layout) -> str:
    """The short ``layout`` label value.

    Example:
        dp=2 tp=1 pp=1 ZeRO-2 -> ``"dp2.tp1.pp1.z2"``.
    """
    return f"dp{layout.dp}.tp{layout.tp}.pp{layout.pp}.z{layout.zero_stage}"
