"""``mla plan --measure``: run the planner's top candidates for a few steps each and pick the
fastest measured one (the DeepSpeed autotuner's idea, Rajbhandari et al. / DeepSpeed docs
"Autotuning": measure instead of predict, here through our own Ray Train workers).

Each candidate becomes a copy of the job with the layout pinned (``parallel`` degrees, ZeRO
stage, recomputation, micro-batch), ``train.steps`` short, one log record per step, no
checkpoint before the end and a run folder of its own (``RUN_DIR-measure-N``); it runs through
the controller's one entry point, :func:`orchestrator.launcher.run_training` (imported
lazily, so this module stays torch- and Ray-free at import). The measured step time is the
median ``step_time_s`` of the logged steps after the first (compile and allocator warm-up).
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from orchestrator.config import JobConfig, validate_job_dict
from orchestrator.contract.errors import PlanError
from orchestrator.contract.layout import Layout
from orchestrator.planner.types import Candidate


@dataclass(frozen=True)
class Measurement:
    """One candidate: its layout, predicted and measured seconds per step (``None``: failed)."""

    layout: Layout
    predicted_step_s: float
    interval_s: tuple
    measured_step_s: float | None
    error: str = ""

    @property
    def ratio(self) -> float | None:
        """Measured / predicted step time."""
        return (
            None if self.measured_step_s is None else self.measured_step_s / self.predicted_step_s
        )

    def to_dict(self) -> dict:
        """JSON form."""
        return {
            "layout": self.layout.to_dict(),
            "predicted_step_s": round(self.predicted_step_s, 6),
            "interval_s": [round(v, 6) for v in self.interval_s],
            "measured_step_s": self.measured_step_s,
            "measured_over_predicted": None if self.ratio is None else round(self.ratio, 4),
            "error": self.error,
        }


def runnable_candidates(candidates: list[Candidate], top: int) -> list[Candidate]:
    """The first ``top`` candidates the DeepSpeed workers can run, the best of each distinct
    ``(dp, tp, pp)`` mesh (close calls are between meshes; a mesh's variants differ less)."""
    from orchestrator.contract.layout import unsupported_reason

    out, seen = [], set()
    for c in candidates:
        mesh = (c.layout.dp, c.layout.tp, c.layout.pp)
        if unsupported_reason(c.layout) is None and mesh not in seen:
            seen.add(mesh)
            out.append(c)
        if len(out) == top:
            break
    return out


def candidate_job(job: JobConfig, layout: Layout, index: int, steps: int) -> JobConfig:
    """``job`` with ``layout`` pinned, ``steps`` steps logged one by one, in its own run folder.

    Example: candidate 0 of ``tiny`` with dp=2 → run name ``tiny-measure-0``, 2 workers,
    ``parallel.data=2``, checkpoint only at the last step, no resume.
    """
    data = job.model_dump(mode="json")
    data["parallel"] = {
        "auto": False,
        "data": layout.dp,
        "tensor": layout.tp,
        "pipeline": layout.pp,
        "zero_stage": layout.zero_stage,
        "recompute": layout.recompute,
        "sequence_parallel": layout.sequence_parallel,
        "virtual_stages": layout.virtual_stages,
    }
    data["train"] |= {
        "steps": steps,
        "micro_batch": layout.micro_batch,
        "log_every": 1,
        "eval_every": steps,
        "eval_batches": 1,
        "warmup_steps": 1,
    }
    data["cluster"] |= {"num_workers": layout.world_size, "min_workers": None, "max_failures": 0}
    data["checkpoint"] |= {"every": steps, "keep": 1, "resume": False}
    data["run"]["name"] = f"{job.run.name}-measure-{index}"
    return validate_job_dict(data, source=f"--measure candidate {index}")


def measured_step_time(run_dir: Path) -> float:
    """Median ``step_time_s`` of the logged steps after the first.

    Raises:
        PlanError: fewer than two steps were logged.
    """
    path = run_dir / "metrics.jsonl"
    records = (
        [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if path.exists()
        else []
    )
    times = [r["step_time_s"] for r in records if "step_time_s" in r][1:]
    if not times:
        raise PlanError(f"{path}: fewer than two logged steps; use --measure-steps 3 or more")
    return statistics.median(times)


def measure(
    job: JobConfig,
    candidates: list[Candidate],
    top: int = 3,
    steps: int = 5,
    run: Callable[[JobConfig], dict] | None = None,
) -> list[Measurement]:
    """Run the first ``top`` runnable ``candidates`` for ``steps`` steps each; fastest measured first.

    Args:
        job: The job to measure (model, data, cluster); its layout fields are replaced.
        candidates: Ranked planner candidates (``PlanResult.candidates``).
        top: How many to run.
        steps: Steps per candidate (>= 2: the first is not timed).
        run: Runs one job; default :func:`orchestrator.launcher.run_training`.

    Raises:
        PlanError: ``steps`` < 2 or no candidate can run on the workers.
    """
    if steps < 2:
        raise PlanError(f"--measure-steps {steps} must be at least 2 (the first step is warm-up)")
    chosen = runnable_candidates(candidates, top)
    if not chosen:
        raise PlanError(
            "no planned layout can run on the DeepSpeed workers (sequence parallelism and "
            "interleaving are not implemented); pin --no-sequence-parallel --virtual-stages 1"
        )
    if run is None:
        from orchestrator.launcher import run_training

        run = run_training
    out = []
    for i, cand in enumerate(chosen):
        sub = candidate_job(job, cand.layout, i, steps)
        est = cand.estimate
        try:
            run(sub)
            out.append(
                Measurement(
                    cand.layout,
                    est.step_time_s,
                    est.step_time_interval_s,
                    measured_step_time(sub.run_dir.resolve()),
                )
            )
        except Exception as exc:  # noqa: BLE001 - a failing candidate (e.g. out of memory) is reported, not fatal
            out.append(
                Measurement(
                    cand.layout,
                    est.step_time_s,
                    est.step_time_interval_s,
                    None,
                    str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__,
                )
            )
    return sorted(out, key=lambda m: (m.measured_step_s is None, m.measured_step_s or 0.0))
