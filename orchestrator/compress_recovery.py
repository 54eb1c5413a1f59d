"""``mla compress --recovery ray``: distil a pruned shape through the cluster's trainer.

The control-plane half of ``mla compress`` (this module never imports torch at import time):
``orchestrator.cli_compress`` hands a :class:`RayRecovery` to the pipeline as
``CompressSettings.recover``, and :mod:`workers.compress` calls it in place of the in-process
loop.

Instead of the in-process loop (:func:`mla.compress.distill.distill`), the pruned student is
written as an export (:func:`mla.pretrained.save_pretrained`) into the staging folder and a job
is built around it -- ``model`` = the pruned shape with ``model.init_from`` = those weights,
``train.distill.teacher`` = the model being compressed, ``data`` = its run's data -- and
launched with :func:`orchestrator.launcher.run_training`, the launcher of ``mla train``
(embedded local Ray unless ``--address``). The final checkpoint is loaded back as the student
and the run folder removed. The optimiser settings follow the in-process loop (AdamW without
weight decay or clipping, betas (0.9, 0.999), no warm-up, cosine decay to 10 % of ``--lr``), so
both recoveries train the same objective; only the data order differs.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.config import ModelSection


@dataclass(frozen=True)
class RayRecovery:
    """How ``--recovery ray`` runs the distillation.

    Attributes:
        source: The compressed model's folder (absolute): the teacher.
        job_data: The source run's ``data`` section (``None``: the defaults).
        workers: Ray Train workers (data parallel).
        address: Ray address (``None``: an embedded local Ray).
    """

    source: str
    job_data: dict | None = None
    workers: int = 1
    address: str | None = None

    def __call__(self, student, s, seq: int, tmp: Path, progress: Callable[..., None]):
        """See :func:`distil_on_ray`."""
        return distil_on_ray(student, s, self, seq, tmp, progress)


def recovery_job(student_cfg, init_from: Path, s, r: RayRecovery, seq: int, run_dir: Path) -> dict:
    """The job dict (``JobConfig`` form) distilling ``student_cfg`` from ``r.source``.

    Args:
        student_cfg: The pruned :class:`mla.config.ModelConfig`.
        init_from: Export folder of the pruned weights.
        s: :class:`workers.compress.CompressSettings` (steps, lr, distill_batch, threads, seed).
        r: Where and on how many workers.
        seq: Tokens per window.
        run_dir: The run folder to create (``run.dir / run.name``).
    """
    model = {k: v for k, v in student_cfg.to_dict().items() if k in ModelSection.model_fields}
    data = {k: v for k, v in (r.job_data or {}).items() if k in ("path", "val_fraction")}
    return {
        "model": {
            **model,
            "max_seq_len": max(model["max_seq_len"], seq),
            "init_from": str(init_from),
        },
        "data": {**data, "seq_len": seq},
        "train": {
            "steps": s.steps,
            "lr": s.lr,
            "min_lr": 0.1 * s.lr,
            "warmup_steps": 0,
            "weight_decay": 0.0,
            "grad_clip": 0.0,
            "betas": [0.9, 0.999],
            "micro_batch": s.distill_batch,
            "global_batch": s.distill_batch * r.workers,
            "precision": "fp32",
            "seed": s.seed,
            "log_every": 1,  # one KL per step, as the in-process loop reports
            "eval_every": s.steps,
            "tensorboard": False,
            "distill": {"teacher": r.source},
        },
        "parallel": {"zero_stage": 0 if r.workers == 1 else 2},
        "cluster": {
            "num_workers": r.workers,
            "address": r.address,
            "cpus_per_worker": 1,
            "torch_threads": s.threads,
            "max_failures": 0,
        },
        "checkpoint": {"every": s.steps, "keep": 1, "resume": False},
        "run": {"name": run_dir.name, "dir": str(run_dir.parent)},
    }


def distil_on_ray(
    student, s, r: RayRecovery, seq: int, tmp: Path, progress: Callable[..., None]
) -> tuple[Any, list[float]]:
    """Distil ``student`` (an :class:`mla.model.MLATransformer`) for ``s.steps`` through the Ray
    Train + DeepSpeed trainer, with the run in ``tmp/recovery`` (removed afterwards).

    Returns:
        ``(student, losses)``: the trained student (eval mode, CPU) and the KL of every
        step (``kl_loss`` of ``metrics.jsonl``).

    Raises:
        ConfigError, CheckpointError, JobFailedError: from the launcher (the job is checked
            before anything starts).
    """
    from mla.pretrained import save_pretrained
    from orchestrator.config import validate_job_dict
    from orchestrator.launcher import run_training
    from workers.inference import load_model

    work = tmp / "recovery"
    init = save_pretrained(student, work / "pruned_init", source={"stage": "pruned"})
    run_dir = work / "runs" / "distil"
    job = validate_job_dict(recovery_job(student.cfg, init, s, r, seq, run_dir), "mla compress")
    run_training(job)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").open() if line.strip()]
    losses = [r["kl_loss"] for r in records if "kl_loss" in r]
    trained = load_model(run_dir).model.eval()
    progress(s.steps, f"KL {losses[-1]:.4f}" if losses else "")
    shutil.rmtree(work)
    return trained, losses
