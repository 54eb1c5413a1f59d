"""Which layouts a job runs under: one per world size, before anything starts (pure Python).

What ``mla train``, ``mla tune`` and ``mla k8s render`` all need, with no Ray and no torch:

* :func:`layout_for_world` -- the layout for one world size (pinned degrees, or the planner's
  choice for ``parallel: auto``), refused when the DeepSpeed workers could not run it;
* :func:`runnable_layouts` -- the one answer to "which world sizes can this job run on";
* :func:`build_run_plan` -- the frozen :class:`~orchestrator.contract.run_plan.RunPlan` handed
  to the workers (layouts and DeepSpeed configs of every runnable size);
* :func:`check_resumable` -- refuse a resume the workers cannot do, before launch.
"""

from __future__ import annotations

from orchestrator.config import JobConfig
from orchestrator.contract.checkpoints import find_resumable, saved_layout
from orchestrator.contract.deepspeed_config import build_deepspeed_config
from orchestrator.contract.errors import PlanError
from orchestrator.contract.layout import Layout, LayoutError, resume_problem, unsupported_reason
from orchestrator.contract.run_plan import RunPlan


def layout_for_world(job: JobConfig, world_size: int) -> Layout:
    """The layout for ``world_size`` workers under the job's ``parallel`` section.

    With ``parallel.auto`` the planner chooses (CPU catalogue entry for local runs, the GPU in
    ``cluster`` otherwise); with pinned degrees ``dp = world_size / (tp * pp)`` and gradient
    accumulation makes up the global batch: ``grad_accum = global_batch / (dp * micro_batch)``.

    Raises:
        PlanError: the degrees do not divide the world size, the batch, or the model.
    """
    if job.parallel.auto:
        return _runnable(
            _auto_layout(job, world_size),
            f"the planner's choice for {world_size} workers (parallel.auto)",
        )
    p, t, model = job.parallel, job.train, job.model_config_()
    unit = p.tensor * p.pipeline
    if world_size % unit:
        raise PlanError(
            f"parallel.tensor({p.tensor}) * parallel.pipeline({p.pipeline}) = {unit} does not divide "
            f"{world_size} workers; use a worker count that is a multiple of {unit}"
        )
    dp = world_size // unit
    if p.data is not None and p.data != dp and world_size == job.cluster.num_workers:
        raise PlanError(
            f"parallel.data({p.data}) * tensor({p.tensor}) * pipeline({p.pipeline}) = "
            f"{p.data * unit} != cluster.num_workers({world_size}); fix one of them or unset parallel.data"
        )
    if t.global_batch % (dp * t.micro_batch):
        raise PlanError(
            f"train.global_batch({t.global_batch}) is not divisible by data-parallel degree ({dp}) * "
            f"train.micro_batch({t.micro_batch}); choose a global batch that is a multiple of "
            f"{dp * t.micro_batch}"
        )
    try:
        layout = Layout(
            dp=dp,
            tp=p.tensor,
            pp=p.pipeline,
            zero_stage=p.zero_stage,
            micro_batch=t.micro_batch,
            grad_accum=t.global_batch // (dp * t.micro_batch),
            recompute=p.recompute,
            sequence_parallel=p.sequence_parallel,
            virtual_stages=p.virtual_stages,
        )
        layout.check_model(model.n_heads, model.kv_heads, model.n_layers)
    except LayoutError as exc:
        raise PlanError(f"parallel: {exc}") from None
    return _runnable(layout, "parallel")


def _runnable(layout: Layout, where: str) -> Layout:
    """``layout`` if the DeepSpeed workers can run it, else :class:`PlanError` with the reason."""
    reason = unsupported_reason(layout)
    if reason is not None:
        raise PlanError(f"{where}: {reason}")
    return layout


def _auto_layout(job: JobConfig, world_size: int) -> Layout:
    from orchestrator.planner import plan_job

    result = plan_job(
        job, world_size=world_size, gpu=job.cluster.gpu if job.cluster.use_gpu else "cpu"
    )
    if result.best is None:  # only estimate mode returns no best; a search returns one or raises
        raise PlanError(
            f"parallel.auto: no layout fits {world_size} workers: {'; '.join(result.notes)}"
        )
    layout = result.best.layout
    if layout.world_size != world_size:
        raise PlanError(
            f"parallel.auto: {'; '.join(result.notes)}; set cluster.num_workers={layout.world_size}"
        )
    return layout


def check_resumable(job: JobConfig, plan: RunPlan) -> None:
    """Refuse, before launch, a resume the workers cannot do.

    Checkpoints of ZeRO 0-2 runs are layout-independent (any plan may load them); ZeRO-3 runs
    keep DeepSpeed's own format, which loads under the layout that wrote it only
    (:func:`~orchestrator.contract.layout.resume_problem`).

    Checkpoints that fail their manifest (:func:`~orchestrator.contract.checkpoints.verify_checkpoint`)
    are named on the console with the reason, and the newest complete one is used instead.

    Raises:
        PlanError: the latest checkpoint and a planned layout differ while either uses ZeRO-3.
    """
    from orchestrator.progress import console

    found, rejected = find_resumable(plan.run_dir) if job.checkpoint.resume else (None, [])
    for path, reason in rejected:
        console.print(f"checkpoint {path.name} rejected: {reason}")
    if found is None:
        if rejected:
            console.print("no complete checkpoint left: starting from step 0")
        return
    if rejected:
        console.print(f"resuming from {found[1].name}, the newest complete checkpoint")
    saved = saved_layout(found[1])
    for w, layout in plan.layouts.items():
        problem = resume_problem(saved, layout)
        if problem and saved is not None:
            raise PlanError(
                f"checkpoint {found[1]} was written under {saved.describe()} and the plan for "
                f"{w} workers is {layout.describe()}; {problem}"
            )


def runnable_layouts(job: JobConfig, sizes: range | None = None) -> dict[int, Layout]:
    """World size -> layout for every size the job can run on, ascending.

    Args:
        job: The validated job.
        sizes: World sizes to try. ``None`` means the job's own: ``cluster.num_workers``, or
            ``cluster.min_workers .. cluster.num_workers`` for an elastic run; then
            ``num_workers`` itself must have a layout.

    Raises:
        PlanError: ``sizes`` is ``None`` and ``cluster.num_workers`` has no layout (the message
            says why).

    Example:
        >>> from orchestrator.config import load_job_config
        >>> sorted(runnable_layouts(load_job_config("configs/tiny.yaml"), range(1, 9)))
        [1, 2, 4]
    """
    hi = job.cluster.num_workers
    tried = sizes if sizes is not None else range(job.cluster.min_workers or hi, hi + 1)
    layouts = {}
    for w in tried:
        if w < 1:
            continue
        try:
            layouts[w] = layout_for_world(job, w)
        except PlanError:
            continue
    if sizes is None and hi not in layouts:
        layout_for_world(job, hi)  # raises with the reason
    return layouts


def build_run_plan(job: JobConfig) -> RunPlan:
    """The :class:`RunPlan` of ``job``: a layout and a DeepSpeed config per runnable world size.

    Raises:
        PlanError: ``cluster.num_workers`` has no layout.
    """
    layouts = runnable_layouts(job)
    return RunPlan(
        job=job,
        layouts=layouts,
        deepspeed={w: build_deepspeed_config(job, layout) for w, layout in layouts.items()},
        run_dir=job.run_dir.resolve(),
        peak_flops=device_peak_flops(job),
    )


def device_peak_flops(job: JobConfig) -> float:
    """Dense peak FLOP/s of one worker's device at the job's training precision (the MFU
    denominator): ``cluster.gpu``'s catalogue entry on GPU, the catalogue's rough ``cpu`` entry
    (0.1 TFLOP/s) for CPU workers; 0 when the catalogue has no peak for that precision.

    Example: an H100 at bf16 -> 989.4e12; CPU workers at fp32 -> 1e11.
    """
    from orchestrator.contract.deepspeed_config import resolve_precision
    from orchestrator.planner.catalogue import get_gpu

    precision = resolve_precision(job.train.precision, job.cluster.use_gpu)
    try:
        return get_gpu(job.cluster.gpu if job.cluster.use_gpu else "cpu").peak_flops(precision)
    except PlanError:
        return 0.0
