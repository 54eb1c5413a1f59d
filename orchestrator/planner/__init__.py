"""Hybrid-parallel planner: choose data x tensor x pipeline degrees, ZeRO stage, micro-batch,
recomputation, sequence parallelism and virtual stages for a model on N GPUs.

Pure Python (no torch). One concept per module: :mod:`.catalogue` (GPUs), :mod:`.shapes`
(model shapes), :mod:`.kernels` (attention/norm kernel costs), :mod:`.memory`, :mod:`.step_time`,
:mod:`.constants` (the fitted constants), :mod:`.evaluate`, :mod:`.search`, :mod:`.job` (job
configs), :mod:`.calibrate` (fitting the efficiency to published runs), :mod:`.sweeps` (the Aleph
Alpha measured sweeps), :mod:`.fit` (fitting the constants to them, leave-one-group-out) and
:mod:`.measure` (``mla plan --measure``).

Example:
    >>> from mla.config import PRESETS
    >>> result = plan(PlanRequest(model=PRESETS["70b"], gpus=64, gpu="h100", global_batch=512))
    >>> result.best.layout.describe()
    'dp=64 tp=1 pp=1 zero=3 mb=2 ga=4 recompute=full'
"""

from orchestrator.planner.catalogue import GPU_CATALOGUE, GpuSpec, get_gpu
from orchestrator.planner.evaluate import estimate
from orchestrator.planner.job import plan_job
from orchestrator.planner.search import min_gpus, plan
from orchestrator.planner.shapes import model_from_params, parse_count
from orchestrator.planner.types import Candidate, Estimate, Pins, PlanRequest, PlanResult, Rejection

__all__ = [
    "GPU_CATALOGUE",
    "GpuSpec",
    "get_gpu",
    "estimate",
    "plan_job",
    "plan",
    "min_gpus",
    "model_from_params",
    "parse_count",
    "Candidate",
    "Estimate",
    "Pins",
    "PlanRequest",
    "PlanResult",
    "Rejection",
]
