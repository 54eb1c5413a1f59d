"""Plan for a job config: the entry point the controller calls."""

from __future__ import annotations

from typing import Any

from orchestrator.config import JobConfig
from orchestrator.contract.deepspeed_config import resolve_precision
from orchestrator.contract.errors import PlanError
from orchestrator.contract.layout import LAYOUT_FREE_ZERO_STAGES
from orchestrator.planner.search import plan
from orchestrator.planner.types import Pins, PlanRequest, PlanResult

_PARALLEL_TO_PIN = {
    "data": "dp",
    "tensor": "tp",
    "pipeline": "pp",
    "zero_stage": "zero_stage",
    "recompute": "recompute",
    "sequence_parallel": "sequence_parallel",
    "virtual_stages": "virtual_stages",
}


def job_pins(job: JobConfig) -> Pins:
    """Pins from ``job.parallel``: the fields the YAML (or ``--set``) sets explicitly, plus the
    job's micro-batch; nothing but the micro-batch when ``parallel: auto``.

    Unset fields keep their defaults out of the search so that any worker count can be planned
    (tiny on 8 CPU workers cannot be dp=8 with micro-batch 8 and global batch 32).
    """
    pins: dict[str, Any] = {"micro_batch": job.train.micro_batch}
    if not job.parallel.auto:
        for name in job.parallel.model_fields_set & set(_PARALLEL_TO_PIN):
            pins[_PARALLEL_TO_PIN[name]] = getattr(job.parallel, name)
    else:
        # What the DeepSpeed workers run (contract.layout.unsupported_reason): no Megatron sequence
        # parallelism, no interleaved virtual stages.
        pins |= {"sequence_parallel": False, "virtual_stages": 1}
    return Pins(**pins)


#: ZeRO stages a ``parallel: auto`` job may be given: ZeRO-3 checkpoints keep DeepSpeed's own
#: per-layout format, so a job re-planned on resume (elastic restarts) could not load them.
AUTO_ZERO_STAGES = LAYOUT_FREE_ZERO_STAGES


def job_precision(job: JobConfig, gpu: str) -> str:
    """``train.precision``, with ``auto`` = fp32 on CPU and bf16 on GPUs."""
    return resolve_precision(job.train.precision, use_gpu=gpu != "cpu")


def plan_job(
    job: JobConfig, world_size: int, gpu: str = "cpu", gpus_per_node: int | None = None
) -> PlanResult:
    """Plan ``job`` on ``world_size`` workers.

    Model from ``job.model_config_()``, sequence length ``job.data.seq_len``, global batch
    ``job.train.global_batch``, pins from :func:`job_pins`. When no layout uses exactly
    ``world_size`` workers (tiny on 5 or 7 workers: 5 and 7 divide neither the 4 heads, the 4
    layers nor the batch of 32), the largest smaller worker count that works is used and
    ``result.notes`` says so; ``result.best.layout.world_size`` is then below ``world_size``.

    Raises:
        PlanError: ``world_size < 1``, or no worker count from ``world_size`` down to 1 has a
            layout.

    Example:
        >>> from orchestrator.config import load_job_config
        >>> plan_job(load_job_config("configs/tiny.yaml"), 2).best.layout.describe()
        'dp=2 tp=1 pp=1 zero=2 mb=8 ga=2'
    """
    if world_size < 1:
        raise PlanError(
            f"cannot plan for world_size={world_size} workers; at least 1 is needed "
            f"(set cluster.num_workers >= 1)"
        )
    first_error: PlanError | None = None
    for n in range(world_size, 0, -1):
        req = PlanRequest(
            model=job.model_config_(),
            gpus=n,
            gpu=gpu,
            global_batch=job.train.global_batch,
            seq_len=job.data.seq_len,
            gpus_per_node=gpus_per_node,
            precision=job_precision(job, gpu),
            pins=job_pins(job),
            allowed_zero_stages=AUTO_ZERO_STAGES if job.parallel.auto else None,
        )
        try:
            result = plan(req)
        except PlanError as exc:
            first_error = first_error or exc
            continue
        if n < world_size:
            why = "; ".join(line.strip() for line in str(first_error).splitlines()[1:3])
            note = f"no layout uses all {world_size} workers ({why}); using {n} of them"
            result = PlanResult(
                result.request,
                result.best,
                result.candidates,
                result.rejected,
                result.estimate,
                result.notes + (note,),
                result.close_call,
            )
        return result
    assert first_error is not None, "world_size >= 1: the loop ran and every try failed"
    raise first_error
