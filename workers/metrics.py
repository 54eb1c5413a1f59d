"""Training metrics through ``ray.util.metrics``, for Prometheus (and the dashboards).

One :class:`TrainMetrics` per worker creates a Ray metric for every entry of the catalogue
:data:`orchestrator.contract.metrics.METRICS` and sets them at the logging interval, at
evaluation and at checkpoints (never per micro-batch). Ray's per-node metrics agent exports
them as ``ray_mla_*`` on the node's metrics port (``cluster.metrics_port`` locally, 8080 on
KubeRay); the export interval is Ray's (``RAY_metrics_report_interval_ms``, 10 s by default),
so Prometheus sees the last value per interval; per-step values stay in ``metrics.jsonl``.

Who exports what (so ``sum``/``avg`` over ranks never double-counts):

* every rank: step, tokens (global tokens / world size each), step-time histogram, data wait,
  peak memory;
* rank 0 (the loss owner: it holds the data-parallel mean loss, and the pipeline engine
  broadcasts the last stage's loss to it): loss, val loss, lr, grad norm, MFU, checkpoints,
  resumes, world size, total steps;
* ranks with data- and tensor-parallel coordinate 0 (one per pipeline stage): the mean gate
  of the layers they hold.
"""

from __future__ import annotations

import math
import resource
import sys
import threading
from collections.abc import Mapping, Sequence

from orchestrator.contract.layout import Layout
from orchestrator.contract.metrics import (
    BY_NAME,
    LAYER_LABEL,
    LAYOUT_LABEL,
    METRICS,
    RANK_LABEL,
    RUN_LABEL,
    layout_label,
)


def mfu(flops_per_token: float, tokens_per_s: float, peak_flops: float, world: int) -> float:
    """Model FLOPs utilisation of the whole run, 0-1.

    ``flops_per_token * tokens_per_s / (peak_flops * world)`` (PaLM, Chowdhery et al. 2022,
    arXiv:2204.02311, App. B; torchtitan ``components/metrics.py`` computes the same per device).

    Args:
        flops_per_token: Training FLOPs per token (:func:`mla.flops.training_flops_per_token`).
        tokens_per_s: Global training throughput, tokens/s.
        peak_flops: Dense peak of one device, FLOP/s.
        world: Devices (Ray Train workers).

    Returns:
        The utilisation; ``nan`` when the peak is unknown (0).

    Example: 5.62e6 FLOPs/token x 3,000 tokens/s / (1e11 x 2) = 0.0843.
    """
    if peak_flops <= 0 or world < 1:
        return math.nan
    return flops_per_token * tokens_per_s / (peak_flops * world)


def peak_memory_bytes(use_gpu: bool) -> int:
    """Peak memory of this process since the last call: ``torch.cuda.max_memory_allocated``
    (reset afterwards, as torchtitan does per logging window) on GPU, peak RSS on CPU."""
    if use_gpu:
        import torch

        peak = int(torch.cuda.max_memory_allocated())
        torch.cuda.reset_peak_memory_stats()
        return peak
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * scale


class TrainMetrics:
    """This worker's Ray metrics; every method is a no-op when Ray is not initialised.

    Args:
        run_name: Ray Train's run name (``RunConfig.name``, the run folder's name).
        rank: World rank.
        layout: The layout of this attempt.
    """

    def __init__(self, run_name: str, rank: int, layout: Layout):
        self.rank, self.world = rank, layout.world_size
        pp_rank, dp_rank, tp_rank = layout.coords(rank)
        self.owns_gate = dp_rank == 0 and tp_rank == 0
        self._run_tags = {RUN_LABEL: run_name, LAYOUT_LABEL: layout_label(layout)}
        self._rank_tags = {**self._run_tags, RANK_LABEL: str(rank)}
        self._run_name = run_name
        self._metrics = _build_ray_metrics()
        self._gauges: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        if self._metrics:
            threading.Thread(target=self._refresh, name="mla-metrics", daemon=True).start()

    @property
    def enabled(self) -> bool:
        """Whether the metrics reach Ray (inside a Ray worker)."""
        return bool(self._metrics)

    def _set(self, name: str, value: float | None, tags: Mapping[str, str]) -> None:
        if name in self._metrics and value is not None and math.isfinite(value):
            with self._lock:
                self._gauges[(name, tuple(sorted(tags.items())))] = float(value)
            self._metrics[name].set(float(value), tags=dict(tags))

    def _refresh(self) -> None:
        """Set every gauge again once per export interval, until :meth:`close`.

        Ray's metrics agent drops a gauge series that its emitter has not set for two export
        intervals (``open_telemetry_metric_recorder._resolve_gauge_ttl_seconds``; 20 s by
        default, 2 s with ``RAY_metrics_report_interval_ms=1000``). Observed here without this
        refresh: gauges set once at the start of an attempt (total steps, FLOPs/token) were in
        Prometheus only for the attempt's first seconds, so the ETA and TFLOP/s panels had no
        value while training ran (tests/test_observability_e2e.py).
        """
        import ray

        period = max(ray._config.metrics_report_interval_ms(), 1000) / 1000.0
        while not self._stop.wait(period):
            with self._lock:
                values = list(self._gauges.items())
            for (name, tags), value in values:
                self._metrics[name].set(value, tags=dict(tags))

    def close(self) -> None:
        """Stop refreshing: the series then age out like those of a dead worker."""
        self._stop.set()

    def _tags(self, name: str) -> Mapping[str, str]:
        return self._rank_tags if RANK_LABEL in BY_NAME[name].labels else self._run_tags

    def start(
        self, total_steps: int, resumes: int, flops_per_token: float, peak_flops: float
    ) -> None:
        """At the start of an attempt (rank 0): world size, total steps, the MFU inputs
        (FLOPs/token, device peak FLOP/s) and the run's resumes so far.

        The resumes are a gauge, not a counter: Ray's ``Counter.inc`` refuses 0, so a counter
        would have no series until the first resume (and no panel value for a healthy run).
        """
        if self.rank != 0 or not self._metrics:
            return
        self._set("mla_train_world_size", self.world, self._run_tags)
        self._set("mla_train_total_steps", total_steps, self._run_tags)
        self._set("mla_train_flops_per_token", flops_per_token, self._run_tags)
        self._set("mla_train_device_peak_flops", peak_flops or None, self._run_tags)
        self._set("mla_train_resumes", resumes, self._run_tags)

    def interval(
        self,
        record: Mapping[str, float | None],
        step_times_s: Sequence[float],
        tokens: int,
        memory_bytes: int,
        mfu_value: float | None = None,
        data_wait_s: float = 0.0,
    ) -> None:
        """At a logging interval.

        Args:
            record: The ``metrics.jsonl`` record (``step``, ``loss``, ``lr``, ...).
            step_times_s: Wall time of each step of the window on this rank, seconds.
            tokens: Global tokens trained in the window.
            memory_bytes: This rank's peak memory over the window, bytes.
            mfu_value: MFU of the window (rank 0), 0-1.
            data_wait_s: Seconds this rank spent fetching batches in the window.
        """
        if not self._metrics:
            return
        self._set("mla_train_step", record.get("step"), self._rank_tags)
        self._metrics["mla_train_tokens"].inc(tokens / self.world, tags=self._rank_tags)
        if data_wait_s > 0:  # Ray's Counter.inc refuses 0
            self._metrics["mla_train_data_wait_seconds"].inc(data_wait_s, tags=self._rank_tags)
        for seconds in step_times_s:
            self._metrics["mla_train_step_seconds"].observe(seconds, tags=self._rank_tags)
        self._set("mla_train_device_memory_peak_bytes", memory_bytes, self._rank_tags)
        if self.rank == 0:
            for key in ("loss", "lr", "grad_norm"):
                self._set(f"mla_train_{key}", record.get(key), self._run_tags)
            self._set("mla_train_mfu", mfu_value, self._run_tags)

    def evaluation(self, val_loss: float | None, gate_means: Mapping[int, float]) -> None:
        """After a validation pass: val loss (rank 0), mean gate per layer held here."""
        if not self._metrics:
            return
        if self.rank == 0:
            self._set("mla_train_val_loss", val_loss, self._run_tags)
        if self.owns_gate:
            for layer, value in gate_means.items():
                tags = {RUN_LABEL: self._run_name, LAYER_LABEL: str(layer)}
                self._set("mla_attention_gate_mean", value, tags)

    def checkpoint(self, step: int, seconds: float) -> None:
        """After a complete checkpoint (rank 0)."""
        if self.rank != 0 or not self._metrics:
            return
        self._metrics["mla_checkpoint_seconds"].observe(seconds, tags=self._run_tags)
        self._set("mla_checkpoint_last_step", step, self._run_tags)


def _build_ray_metrics() -> dict:
    """One ``ray.util.metrics`` object per catalogue entry; empty outside a Ray worker."""
    try:
        import ray
        from ray.util import metrics as ray_metrics
    except ImportError:
        return {}
    if not ray.is_initialized():
        return {}
    built: dict = {}
    for spec in METRICS:
        if spec.kind == "gauge":
            built[spec.name] = ray_metrics.Gauge(spec.name, spec.description, spec.labels)
        elif spec.kind == "counter":
            built[spec.name] = ray_metrics.Counter(spec.name, spec.description, spec.labels)
        else:
            built[spec.name] = ray_metrics.Histogram(
                spec.name, spec.description, list(spec.buckets), spec.labels
            )
    return built
