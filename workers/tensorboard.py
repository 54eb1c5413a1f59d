"""TensorBoard event files of a run, written by the loss-owner rank (rank 0).

``RUN_DIR/tb/`` gets, mirroring torchtitan's metric names where it helps
(``../shared/anchors/observability/REPORT.md`` §3.5):

* every logged step: ``train/loss``, ``train/lr``, ``train/grad_norm``, ``perf/tokens_per_s``,
  ``perf/step_time_s``, ``perf/mfu``, ``memory/peak_gib``;
* every evaluation: ``val/loss``, ``attention/gate_mean/layer_L`` (share of the local branch),
  the histogram ``attention/gate/layer_L`` of the per-head mean gates, and the image
  ``attention/map/layer_L_head_0`` of the effective attention on a fixed held-out window
  (:mod:`workers.attention_probe`; first and last block, tensor-parallel degree 1, ZeRO <= 2);
* at each start or resume: the job config (YAML) and the layout as text.

A resumed attempt opens the writer with ``purge_step = resumed step + 1``: TensorBoard (and its
``EventAccumulator``) then drops the events a killed attempt wrote past its last checkpoint, as
``metrics.jsonl`` is trimmed, so no step appears twice. The writer is flushed at every
checkpoint, so everything up to a checkpoint survives a kill -9.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

TB_DIR = "tb"
"""Event-file folder inside RUN_DIR."""

_SCALARS = {
    "loss": "train/loss",
    "lr": "train/lr",
    "grad_norm": "train/grad_norm",
    "tokens_per_s": "perf/tokens_per_s",
    "step_time_s": "perf/step_time_s",
    "mfu": "perf/mfu",
    "peak_memory_gib": "memory/peak_gib",
    "val_loss": "val/loss",
    "kl_loss": "train/kl_loss",  # train.distill: the unweighted parts of the loss
    "lm_loss": "train/lm_loss",
}
"""``metrics.jsonl``-style record key -> TensorBoard tag."""


def open_board(run_dir: Path, resumed_step: int) -> RunBoard | None:
    """A :class:`RunBoard`, or ``None`` (with a warning on stderr) when the ``tensorboard``
    package is missing on this node: event files are an aid, not a reason to fail a run."""
    try:
        return RunBoard(run_dir, resumed_step)
    except ImportError as exc:
        print(f"warning: no TensorBoard events ({exc}); pip install tensorboard", file=sys.stderr)
        return None


class RunBoard:
    """The run's ``SummaryWriter`` (rank 0 only).

    Args:
        run_dir: RUN_DIR; events go to ``RUN_DIR/tb``.
        resumed_step: Step the attempt resumed from (0 for a fresh run): later events of earlier
            attempts are purged.
    """

    def __init__(self, run_dir: Path, resumed_step: int):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(
            str(run_dir / TB_DIR), purge_step=resumed_step + 1 if resumed_step > 0 else None
        )

    def start(self, step: int, config: Mapping, layout: str) -> None:
        """Record the job config (YAML) and the layout of this attempt as text at ``step``."""
        self.writer.add_text(
            "run/config", _code(yaml.safe_dump(dict(config), sort_keys=False)), step
        )
        self.writer.add_text("run/layout", layout, step)

    def scalars(self, step: int, record: Mapping[str, float | None]) -> None:
        """Every known finite value of ``record`` as a scalar at ``step``."""
        for key, tag in _SCALARS.items():
            value = record.get(key)
            if isinstance(value, (int, float)) and math.isfinite(value):
                self.writer.add_scalar(tag, float(value), step)

    def gates(self, step: int, head_means: Mapping[int, list[float]]) -> None:
        """Per layer: the mean gate (scalar) and the histogram of its per-head means."""
        import numpy as np

        for layer, heads in head_means.items():
            self.writer.add_scalar(
                f"attention/gate_mean/layer_{layer}", float(np.mean(heads)), step
            )
            self.writer.add_histogram(f"attention/gate/layer_{layer}", np.asarray(heads), step)

    def attention(self, step: int, maps: Mapping[int, Any], head: int = 0) -> None:
        """``attention/map/layer_L_head_H``: the effective attention of ``head`` on the probe
        window as a grey image (weights / row maximum of the image), rows = queries."""
        for layer, amap in maps.items():
            weights = amap.weights[head]
            image = weights / weights.max().clamp_min(1e-12)
            self.writer.add_image(
                f"attention/map/layer_{layer}_head_{head}", image[None], step, dataformats="CHW"
            )

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def _code(text: str) -> str:
    """Markdown code block (TensorBoard's text plugin renders markdown)."""
    return "\n".join("    " + line for line in text.splitlines())
