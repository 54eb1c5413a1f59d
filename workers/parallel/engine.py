"""``build_engine``: groups -> model -> ``deepspeed.initialize``, behind one small adapter.

The adapter gives the training loop the same calls for DeepSpeed's plain engine (``pp == 1``:
ZeRO 0-3 over the data-parallel group, our ``mpu`` naming the groups) and its
``PipelineEngine`` (``pp > 1``: ZeRO 0-1, 1F1B schedule over ``grad_accum`` micro-batches):

* :meth:`ParallelEngine.train_batch` -- one optimizer step over this data-parallel rank's share
  of the global batch; returns the mean micro-batch loss averaged over data-parallel ranks;
* :meth:`ParallelEngine.eval_batch` -- the same without gradients;
* ``save_checkpoint`` / ``load_checkpoint`` -- layout-independent checkpoints
  (:mod:`workers.parallel.reshard`), with DeepSpeed's signature so that
  :mod:`workers.checkpoint` stays the one place that makes them atomic.

Loss convention: every micro-batch loss is a mean over its tokens; DeepSpeed divides each by
``grad_accum`` and averages gradients over the ``dp`` ranks, so the step's gradient is the
gradient of the mean token loss of the whole global batch for every layout.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.distributed as dist

from mla.config import ModelConfig
from orchestrator.contract.layout import Layout
from workers.parallel.groups import ParallelGroups, build_groups
from workers.parallel.pipeline import apply_freeze, build_pipeline, canonical_parameters


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay on matrices (dim >= 2), none on norms, gate biases and vectors."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


def pipeline_ds_config(ds_config: dict) -> dict:
    """The DeepSpeed config for a ``PipelineEngine``: activations travel whole between stages
    (``pipe_partitioned``/``grad_partitioned`` off: every tensor rank holds the full activation)."""
    cfg = copy.deepcopy(ds_config)
    cfg.setdefault("pipeline", {}).update({"pipe_partitioned": False, "grad_partitioned": False})
    return cfg


class ParallelEngine:
    """One interface over a DeepSpeed engine for any ``(dp, tp, pp)`` layout.

    Attributes:
        engine: ``DeepSpeedEngine`` or ``PipelineEngine``.
        layout: The layout.
        groups: This rank's process groups (the ``mpu``).
        device: Where batches go.
    """

    def __init__(
        self, engine, layout: Layout, groups: ParallelGroups, device: torch.device, loss_fn=None
    ):
        self.engine, self.layout, self.groups, self.device = engine, layout, groups, device
        self.is_pipeline = layout.pp > 1
        #: The run's loss function; a :class:`workers.distill.DistillLoss` makes training
        #: micro-batches carry ``(targets, inputs)`` labels (the teacher needs the inputs).
        self.loss_fn = loss_fn
        self.distill = hasattr(loss_fn, "take_metrics")

    # ------------------------------------------------------------------ steps
    def _micro_batches(
        self, x: np.ndarray, y: np.ndarray
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        mb = self.layout.micro_batch
        return [
            (
                torch.from_numpy(x[i : i + mb]).to(self.device),
                torch.from_numpy(y[i : i + mb]).to(self.device),
            )
            for i in range(0, len(x), mb)
        ]

    def train_batch(self, x: np.ndarray, y: np.ndarray) -> float:
        """One optimizer step.

        Args:
            x, y: This data-parallel rank's inputs and targets, ``(grad_accum * micro_batch, seq)``.

        Returns:
            Mean micro-batch loss, averaged over the data-parallel ranks (same on every rank).
        """
        batches: list = self._micro_batches(x, y)
        if self.distill:  # the loss on the last stage needs the inputs for the teacher
            batches = [(xb, (yb, xb)) for xb, yb in batches]
        if self.is_pipeline:
            return float(self.engine.train_batch(iter(batches)))
        total = torch.zeros((), dtype=torch.float64)
        for xb, yb in batches:
            loss = self.engine(xb, yb)
            self.engine.backward(loss)
            self.engine.step()
            total += loss.detach().double().cpu()
        return self._dp_mean(total / len(batches))

    @torch.no_grad()
    def eval_batch(self, x: np.ndarray, y: np.ndarray) -> float:
        """Mean loss of ``(x, y)`` (equal micro-batches), averaged over data-parallel ranks."""
        batches = self._micro_batches(x, y)
        if self.is_pipeline:
            return float(self.engine.eval_batch(iter(batches), num_micro_batches=len(batches)))
        self.engine.eval()
        try:
            total = sum(float(self.engine(xb, yb)) for xb, yb in batches)
        finally:
            self.engine.train()
        return self._dp_mean(torch.tensor(total / len(batches), dtype=torch.float64))

    def _dp_mean(self, value: torch.Tensor) -> float:
        if self.layout.dp == 1:
            return float(value)
        value = value.to(self.device)
        dist.all_reduce(value, group=self.groups.dp_group)
        return float(value) / self.layout.dp

    def get_lr(self) -> list[float]:
        return self.engine.get_lr()

    def set_lr(self, lr: float) -> None:
        """Run the next optimizer step at ``lr`` (the schedule lives in :mod:`workers.schedule`)."""
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr

    def skipped_steps(self) -> int:
        """Optimizer steps DeepSpeed skipped so far (gradient overflow)."""
        return int(getattr(self.engine, "skipped_steps", 0) or 0)

    def grad_norm(self) -> float | None:
        """Global gradient 2-norm of the last step, ``None`` when DeepSpeed did not compute one."""
        try:
            norm = self.engine.get_global_grad_norm()
        except Exception:  # some engines/stages do not track it
            return None
        return None if norm is None else float(norm)

    def params_finite(self) -> bool:
        """Whether every parameter of every rank is finite (collective over the whole world)."""
        bad = torch.zeros((), dtype=torch.float32)
        for p in self.engine.module.parameters():
            local = getattr(p, "ds_tensor", None)  # ZeRO-3 keeps only this rank's partition
            if not torch.isfinite((p if local is None else local).detach()).all():
                bad.fill_(1.0)
                break
        if dist.is_initialized() and dist.get_world_size() > 1:
            bad = bad.to(self.device)
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        return float(bad) == 0.0

    def canonical_parameters(self) -> dict[str, torch.nn.Parameter]:
        """This rank's parameters under :class:`mla.model.MLATransformer` names."""
        return canonical_parameters(self.engine.module)

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(
        self, path: str, tag: str, client_state: dict | None = None, save_latest: bool = False
    ) -> None:
        """Write a checkpoint into ``path/tag`` (collective): layout-independent (consolidated)
        for ZeRO 0-2; DeepSpeed's own format for ZeRO-3, which loads under the same layout only."""
        from workers.parallel.reshard import save_consolidated

        if not self.layout.layout_free_checkpoints:
            self.engine.save_checkpoint(
                path, tag=tag, client_state=client_state or {}, save_latest=False
            )
            return
        save_consolidated(self, f"{path}/{tag}", client_state or {})

    def load_checkpoint(self, path: str, tag: str) -> tuple[str, dict]:
        """Load a checkpoint; returns ``(path, client_state)``.

        Raises:
            RuntimeError: a ZeRO-3 (DeepSpeed-format) checkpoint and this layout differ, or the
                checkpoint cannot be read.
        """
        from workers.parallel.reshard import is_consolidated, load_consolidated

        if is_consolidated(f"{path}/{tag}"):
            return path, load_consolidated(self, f"{path}/{tag}")
        load_path, client = self.engine.load_checkpoint(path, tag=tag)
        if load_path is None:
            raise RuntimeError(
                f"DeepSpeed could not load the ZeRO-3 checkpoint {path}; ZeRO-3 checkpoints "
                "load under the layout that wrote them only"
            )
        return load_path, client


def build_engine(
    layout: Layout,
    ds_config: dict,
    model_cfg: ModelConfig,
    seed: int,
    weight_decay: float,
    device: torch.device | None = None,
    frozen: frozenset[str] = frozenset(),
    wrap_loss=None,
) -> ParallelEngine:
    """Groups, model and DeepSpeed engine for this rank (after ``deepspeed.init_distributed``).

    Args:
        layout: The layout; ``dp * tp * pp`` must equal the process group's size.
        ds_config: DeepSpeed config from :func:`orchestrator.contract.deepspeed_config.build_deepspeed_config`.
        model_cfg: Model shape.
        seed: Initialisation seed (same weights for every layout).
        weight_decay: AdamW weight decay on matrices.
        device: Where batches go (default CPU).
        frozen: Canonical parameter names to freeze (``train.freeze``,
            :func:`mla.freeze.frozen_parameters`): they are left out of the optimizer (no AdamW
            state, no ZeRO partition, no gradient all-reduce: DeepSpeed reduces only parameters
            that require a gradient).
        wrap_loss: ``base_loss -> loss`` giving the run's loss function (``train.distill``:
            :class:`workers.distill.DistillLoss`), or ``None`` for the cross-entropy.

    Returns:
        The :class:`ParallelEngine`.
    """
    import deepspeed

    groups = build_groups(layout)
    model = build_pipeline(model_cfg, layout, groups, seed, wrap_loss)
    apply_freeze(model, frozen)
    params = param_groups(model, weight_decay)
    if layout.pp > 1:
        engine, _, _, _ = deepspeed.initialize(
            model=model, model_parameters=params, config=pipeline_ds_config(ds_config)
        )
    else:
        engine, _, _, _ = deepspeed.initialize(
            model=model, model_parameters=params, config=ds_config, mpu=groups
        )
    loss_fn = model.loss_fn  # PipelineModule and SequentialLM both keep it there
    return ParallelEngine(engine, layout, groups, device or torch.device("cpu"), loss_fn)
