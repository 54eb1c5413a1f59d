"""``RunPlan``: the one frozen object the driver hands to every Ray Train worker.

The controller validates the job, plans a layout and builds a DeepSpeed config for every world
size the run may have (one, or each runnable size of an elastic range), and ships the whole
``RunPlan`` as ``train_loop_config={"plan": plan}``. Ray pickles it (it is never written as
JSON), so world sizes are ``int`` keys and the job is the validated :class:`JobConfig` itself:
a misspelt field fails in the type checker or on the driver, not at step N on the cluster.
Style-notes: "objects that cross into Ray workers are plain frozen dataclasses".
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mla.config import ModelConfig
from orchestrator.config import JobConfig
from orchestrator.contract.distill import DistillPlan
from orchestrator.contract.finetune import FinetunePlan
from orchestrator.contract.layout import Layout
from orchestrator.contract.privacy import PrivacyPlan


@dataclass(frozen=True)
class RunPlan:
    """Everything a worker needs, built once by the controller.

    Attributes:
        job: The validated job.
        layouts: World size -> layout, for every size the run may be given.
        deepspeed: World size -> DeepSpeed config (:func:`build_deepspeed_config`) of that layout.
        run_dir: Absolute RUN_DIR shared by all workers.
        privacy: The DP-SGD plan under ``train.privacy`` (:mod:`orchestrator.privacy`), else ``None``.
        peak_flops: Dense peak FLOP/s of one worker's device at the training precision, from
            the planner's GPU catalogue (the ``cpu`` entry for CPU workers); the MFU
            denominator. 0 when unknown (then no MFU is exported).
        finetune: Weights to start from and parameters to freeze
            (:mod:`orchestrator.finetune`); ``None`` trains every parameter from the seed.
        distill: The teacher and loss weights under ``train.distill``
            (:mod:`orchestrator.distill`), else ``None``.

    Raises:
        ValueError: on creation, if ``layouts`` and ``deepspeed`` plan different sizes, a layout
            does not occupy its key's world size, or ``run_dir`` is relative.
    """

    job: JobConfig
    layouts: Mapping[int, Layout]
    deepspeed: Mapping[int, Mapping[str, Any]]
    run_dir: Path
    privacy: PrivacyPlan | None = None
    peak_flops: float = 0.0
    finetune: FinetunePlan | None = None
    distill: DistillPlan | None = None

    def __post_init__(self) -> None:
        if set(self.layouts) != set(self.deepspeed) or not self.layouts:
            raise ValueError(
                f"layouts {sorted(self.layouts)} and deepspeed {sorted(self.deepspeed)} "
                "must plan the same, non-empty set of world sizes"
            )
        for world, layout in self.layouts.items():
            layout.check_world_size(world)
        if not self.run_dir.is_absolute():
            raise ValueError(f"run_dir={self.run_dir} must be absolute (every worker resolves it)")

    @property
    def world_sizes(self) -> list[int]:
        """The planned world sizes, ascending."""
        return sorted(self.layouts)

    @property
    def main_layout(self) -> Layout:
        """The layout of the largest planned world size (``cluster.num_workers``)."""
        return self.layouts[self.world_sizes[-1]]

    @property
    def model(self) -> ModelConfig:
        """The model shape (derived from the job: :meth:`JobConfig.model_config_`)."""
        return self.job.model_config_()

    def for_world(self, world_size: int) -> tuple[Layout, dict]:
        """``(layout, deepspeed config)`` for the world size Ray Train actually started.

        Raises:
            RuntimeError: nothing was planned for ``world_size``.
        """
        if world_size not in self.layouts:
            raise RuntimeError(
                f"no layout was planned for world_size={world_size}; planned: {self.world_sizes}"
            )
        return self.layouts[world_size], dict(self.deepspeed[world_size])
