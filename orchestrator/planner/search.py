"""Search every layout for a request, rank the ones that fit, explain the others.

Layouts: every ``dp·tp·pp = N`` with tp ≤ G dividing the (key/value) heads, pp ≤ layers (uneven
split as ``memory.layers_on_stage``), dp dividing the global batch; for each, ZeRO 0-3 (0-1 with
pipelines, as DeepSpeed), recomputation none/selective/full, sequence parallelism when tp > 1,
virtual stages dividing the layers per stage, and micro-batches dividing ``B/dp``. ZeRO stages are
limited by ``PlanRequest.allowed_zero_stages`` (the framework's). The ranking is predicted tokens/s,
then lower memory; among layouts within ``TIE_TOLERANCE`` of the fastest, :func:`preference` picks.
"""

from __future__ import annotations

import itertools
import math

from orchestrator.contract.errors import PlanError
from orchestrator.contract.layout import RECOMPUTE_CHOICES, Layout, LayoutError, Recompute
from orchestrator.planner.evaluate import estimate, layout_problem, mesh_problem
from orchestrator.planner.memory import GIB
from orchestrator.planner.types import PIN_FIELDS, Candidate, PlanRequest, PlanResult, Rejection

RECOMPUTE = RECOMPUTE_CHOICES


def divisors(n: int) -> list[int]:
    """Positive divisors of ``n``, ascending. Example: ``divisors(12) == [1, 2, 3, 4, 6, 12]``."""
    small = [d for d in range(1, int(n**0.5) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))


def meshes(req: PlanRequest) -> list[tuple[int, int, int]]:
    """``(dp, tp, pp)`` with ``dp·tp·pp = N`` that respect the pinned degrees."""
    out = []
    for tp in divisors(req.gpus):
        for pp in divisors(req.gpus // tp):
            dp = req.gpus // (tp * pp)
            if (
                req.pins.allows("dp", dp)
                and req.pins.allows("tp", tp)
                and req.pins.allows("pp", pp)
            ):
                out.append((dp, tp, pp))
    return out


def variants(req: PlanRequest, dp: int, tp: int, pp: int):
    """Layouts on one mesh, grouped so that each group's micro-batches ascend (memory grows)."""
    pins, layers = req.pins, req.model.n_layers
    zeros = [z for z in (0, 1, 2, 3) if req.zero_allowed(z, pp)]
    recs = [r for r in RECOMPUTE if pins.allows("recompute", r)]
    sps = [
        s for s in ((False, True) if tp > 1 else (False,)) if pins.allows("sequence_parallel", s)
    ]
    if pins.sequence_parallel and tp == 1:
        sps = [True]
    vs = [
        v
        for v in divisors(layers // pp if layers % pp == 0 else 1)
        if pins.allows("virtual_stages", v)
    ]
    if pins.virtual_stages and pins.virtual_stages not in vs:
        vs = [pins.virtual_stages]
    mbs = [b for b in divisors(req.global_batch // dp) if pins.allows("micro_batch", b)]
    if not mbs and pins.micro_batch is not None:
        mbs = [pins.micro_batch]  # pinned to a non-divisor: the layout checks say why
    for zero, rec, sp, v in itertools.product(zeros, recs, sps, vs if pp > 1 else [1]):
        yield [
            dict(
                dp=dp,
                tp=tp,
                pp=pp,
                zero_stage=zero,
                recompute=rec,
                sequence_parallel=sp,
                virtual_stages=v,
                micro_batch=mb,
                grad_accum=max(1, req.global_batch // (dp * mb)),
            )
            for mb in mbs
        ]


def search_mesh(
    req: PlanRequest, dp: int, tp: int, pp: int
) -> tuple[list[Candidate], Rejection | None]:
    """Fitting candidates on one mesh, or one rejection (the least-memory variant's reason)."""
    fitting, smallest, problems = [], None, []
    for group in variants(req, dp, tp, pp):
        for fields in group:
            try:
                layout = Layout(**fields)
            except LayoutError as exc:
                problems.append(str(exc))
                continue
            problem = layout_problem(req, layout)
            if problem:
                problems.append(problem)
                continue
            est = estimate(req, layout)
            if est.fits:
                fitting.append(Candidate(layout, est))
                continue
            if smallest is None or est.memory.total < smallest.estimate.memory.total:
                smallest = Candidate(layout, est)
            break  # larger micro-batches need more memory
    if fitting:
        return fitting, None
    if smallest is not None:
        return [], Rejection(smallest.layout.to_dict(), smallest.estimate.reason)
    return [], Rejection(
        {"dp": dp, "tp": tp, "pp": pp}, problems[0] if problems else "no variant allowed by pins"
    )


#: Predictions closer than this fraction are a tie: the step-time model cannot resolve them (its
#: median error on the published runs is about 10%, benchmarks/planner.py).
TIE_TOLERANCE = 0.07
#: Among tied layouts, one using more than this fraction of GPU memory is "tight": real runs keep
#: a margin for allocator fragmentation, NCCL buffers and transient peaks that the memory model
#: does not count, so practitioners add pipeline stages before running near the limit. A soft
#: preference, not a limit: a tight layout still fits, and is chosen when nothing comparable is
#: roomier. This value and ``TIE_TOLERANCE`` were chosen on published_layouts.csv (the largest
#: fraction, then the smallest tolerance, among the best grid points); benchmarks/planner.py prints
#: the sweep and a leave-one-out check of that choice.
COMFORTABLE_MEMORY_FRACTION = 0.8


def tight(c: Candidate, comfortable: float = COMFORTABLE_MEMORY_FRACTION) -> bool:
    """True when ``c`` uses more than ``comfortable`` of the GPU's memory."""
    return c.estimate.memory.total > comfortable * c.estimate.memory_limit_gib * GIB


def preference(c: Candidate, comfortable: float = COMFORTABLE_MEMORY_FRACTION) -> tuple:
    """Sort key among tied layouts, smaller preferred: roomy before :func:`tight`, then
    Narayanan et al. SC21 §3.3 takeaways: a model-parallel size ``t·p`` no larger than needed
    (data parallelism as large as possible, takeaway #2), tensor before pipeline parallelism
    within a node (takeaway #1), then no more interleaving than needed (fewer P2P sends, §2.2.2).

    Example: (dp=32, tp=8, pp=1) before (dp=32, tp=4, pp=2) before (dp=16, tp=8, pp=2).
    """
    lay = c.layout
    return (tight(c, comfortable), lay.tp * lay.pp, -lay.tp, lay.virtual_stages)


def rank(
    candidates: list[Candidate],
    tolerance: float = TIE_TOLERANCE,
    comfortable: float = COMFORTABLE_MEMORY_FRACTION,
) -> list[Candidate]:
    """Best first: highest tokens/s, then least memory; the first is the preferred layout
    (:func:`preference`) among those within ``tolerance`` of the fastest.
    """
    ordered = sorted(candidates, key=lambda c: (-c.estimate.tokens_per_s, c.estimate.memory.total))
    if not ordered:
        return ordered
    floor = (1 - tolerance) * ordered[0].estimate.tokens_per_s
    near = [c for c in ordered if c.estimate.tokens_per_s >= floor]
    best = min(near, key=lambda c: preference(c, comfortable))
    return [best] + [c for c in ordered if c is not best]


def explain(best: Candidate, ranked: list[Candidate]) -> str:
    """Why ``best`` was chosen, naming the runner-up on another mesh."""
    e = best.estimate
    text = (
        f"highest predicted throughput of {len(ranked)} fitting layouts: {e.tokens_per_s:,.0f} tokens/s, "
        f"MFU {100 * e.mfu:.1f}%, {e.memory.total / GIB:.1f} of {e.memory_limit_gib:g} GiB"
    )
    mesh = lambda c: (c.layout.dp, c.layout.tp, c.layout.pp)  # noqa: E731
    other = next((c for c in ranked if mesh(c) != mesh(best)), None)
    if other is not None:
        delta = 100 * (other.estimate.tokens_per_s / e.tokens_per_s - 1)
        text += (
            f"; best other degrees dp={other.layout.dp} tp={other.layout.tp} pp={other.layout.pp}: "
            f"{delta:+.1f}% tokens/s"
        )
        if delta > 0:
            text += (
                f" (within the {100 * TIE_TOLERANCE:g}% tie tolerance; preferred: memory below "
                f"{100 * COMFORTABLE_MEMORY_FRACTION:g}% of the GPU, then smaller tp*pp, then larger tp)"
            )
    return text


def plan(req: PlanRequest) -> PlanResult:
    """Plan ``req``: every layout (or exactly the pinned one), ranked, with rejections.

    Raises:
        PlanError: no layout can run (the message gives each reason and the minimum GPU count
            that fits), or a fully pinned layout is structurally impossible.
    """
    if req.pins.complete():
        return _estimate_only(req)
    candidates, rejected = [], []
    for dp, tp, pp in meshes(req):
        problem = mesh_problem(req, dp, tp, pp)
        if problem:
            rejected.append(Rejection({"dp": dp, "tp": tp, "pp": pp}, problem))
            continue
        fitting, rejection = search_mesh(req, dp, tp, pp)
        candidates += fitting
        if rejection:
            rejected.append(rejection)
    if not candidates:
        raise PlanError(no_layout_message(req, rejected))
    ranked = rank(candidates)
    best = Candidate(ranked[0].layout, ranked[0].estimate, explain(ranked[0], ranked))
    note = close_call_note(req, best, ranked)
    return PlanResult(req, best, [best] + ranked[1:], rejected, close_call=note)


def estimate_command(layout: Layout, gpu_name: str) -> str:
    """The ``mla plan --estimate`` pins of ``layout`` (model and batch options to add).

    Example: ``mla plan --estimate --gpu h100 --dp 8 --tp 1 --pp 1 --zero 1 --micro-batch 1
    --recompute none --no-sequence-parallel --virtual-stages 1``.
    """
    sp = "--sequence-parallel" if layout.sequence_parallel else "--no-sequence-parallel"
    return (
        f"mla plan --estimate --gpu {gpu_name} --dp {layout.dp} --tp {layout.tp} --pp {layout.pp} "
        f"--zero {layout.zero_stage} --micro-batch {layout.micro_batch} --recompute {layout.recompute} {sp} "
        f"--virtual-stages {layout.virtual_stages}"
    )


def close_call_note(req: PlanRequest, best: Candidate, ranked: list[Candidate]) -> str:
    """A note when the best layout on other degrees is predicted within the model's comparison
    error (:attr:`.constants.CostConstants.relative_error`) of the chosen one ('' otherwise).

    Example: "dp=8 tp=1 pp=1 ... and dp=4 tp=2 pp=1 ... are within the model's error (±12%
    between layouts): measure both: `mla plan --estimate ...` ..., or settle it with
    `mla plan --measure`".
    """
    error = req.constants.relative_error
    mesh = lambda c: (c.layout.dp, c.layout.tp, c.layout.pp)  # noqa: E731
    other = next((c for c in ranked if mesh(c) != mesh(best)), None)
    if not error or other is None:
        return ""
    gap = abs(math.log(other.estimate.step_time_s / best.estimate.step_time_s))
    if gap >= error:
        return ""
    return (
        f"{best.layout.describe()} and {other.layout.describe()} are predicted {100 * gap:.1f}% apart, within "
        f"the model's error (±{100 * error:.0f}% between layouts of one job): measure both: "
        f"`{estimate_command(best.layout, req.gpu_spec.name)}` and `{estimate_command(other.layout, req.gpu_spec.name)}` "
        f"(with the same model and batch options) give the predictions; `mla plan --measure` runs them"
    )


def _estimate_only(req: PlanRequest) -> PlanResult:
    p = req.pins
    dp, tp, pp, zero, mb = p.dp, p.tp, p.pp, p.zero_stage, p.micro_batch
    rec, sp, v = p.recompute, p.sequence_parallel, p.virtual_stages
    if (
        dp is None
        or tp is None
        or pp is None
        or zero is None
        or mb is None
        or rec is None
        or sp is None
        or v is None
    ):
        missing = [f for f in PIN_FIELDS if getattr(p, f) is None]
        raise PlanError(
            f"an estimate needs every layout field pinned; missing: {', '.join(missing)}"
        )
    per_replica = req.global_batch // dp if dp else 0
    try:
        layout = Layout(
            dp=dp,
            tp=tp,
            pp=pp,
            zero_stage=zero,
            micro_batch=mb,
            grad_accum=max(1, per_replica // mb),
            recompute=rec,
            sequence_parallel=sp,
            virtual_stages=v,
        )
    except LayoutError as exc:
        raise PlanError(f"pinned layout is invalid: {exc}") from None
    if layout.world_size != req.gpus:
        raise PlanError(
            f"dp({p.dp}) * tp({p.tp}) * pp({p.pp}) = {layout.world_size} != gpus({req.gpus}); "
            f"pass --gpus {layout.world_size} or change the degrees"
        )
    problem = layout_problem(req, layout)
    if problem:
        raise PlanError(f"pinned layout {layout.describe()} cannot run: {problem}")
    est = estimate(req, layout)
    cand = Candidate(layout, est, "pinned layout" if est.fits else est.reason)
    return PlanResult(
        req,
        cand if est.fits else None,
        [cand] if est.fits else [],
        [] if est.fits else [Rejection(layout.to_dict(), est.reason)],
        estimate=cand,
    )


def no_layout_message(req: PlanRequest, rejected: list[Rejection]) -> str:
    """PlanError text: the reasons by mesh and what would fit."""
    lines = [
        f"no layout of {req.gpus} x {req.gpu_spec.name} ({req.gpu_spec.memory_gib:g} GiB) can train this model "
        f"(global batch {req.global_batch}, seq {req.seq_len}, {req.precision}):"
    ]
    lines += [
        f"  dp={r.layout.get('dp')} tp={r.layout.get('tp')} pp={r.layout.get('pp')}: {r.reason}"
        for r in rejected[:12]
    ]
    if len(rejected) > 12:
        lines.append(f"  ... and {len(rejected) - 12} more")
    if not rejected:
        lines.append(
            f"  no (dp, tp, pp) with dp*tp*pp = {req.gpus} matches the pins {req.pins.to_dict()}"
        )
        lines.append(
            f"fix: pin --dp/--tp/--pp to divisors of {req.gpus} ({divisors(req.gpus)}) whose "
            f"product is {req.gpus}, or change --gpus"
        )
    if any("not divisible by dp" in r.reason for r in rejected) and all(
        "not divisible" in r.reason or "tp=" in r.reason or "pp=" in r.reason for r in rejected
    ):
        ok = [d for d in divisors(req.global_batch) if req.gpus % d == 0]
        lines.append(
            f"fix: use a global batch divisible by a data-parallel degree dividing {req.gpus} "
            f"(e.g. {req.gpus * 8}); divisors usable now: {ok}"
        )
    elif any(r.reason.startswith("total") for r in rejected):
        lines.append(min_gpus_hint(req))
    elif rejected:
        lines.append(
            f"fix: tp must divide the heads ({req.model.n_heads}) and the {req.node_size} GPUs per node, "
            f"pp at most the layers ({req.model.n_layers}); unpin or change --tp/--pp/--gpus"
        )
    return "\n".join(lines)


def min_gpus_hint(req: PlanRequest) -> str:
    """``fix: ... needs at least N GPUs`` (or that no count up to 2^20 fits)."""
    n, layout = min_gpus(req)
    if n is None or layout is None:  # min_gpus returns both or neither
        return (
            "fix: no GPU count up to 1,048,576 fits; use GPUs with more memory or a smaller model"
        )
    return (
        f"fix: the smallest GPU count that fits is {n} ({layout.describe()}), "
        f"or use GPUs with more memory / a shorter sequence"
    )


def fits_somewhere(req: PlanRequest) -> Layout | None:
    """A layout that fits on ``req.gpus`` GPUs, trying only the least-memory variants (fast).

    The global batch is taken as ``max(B, N)`` rounded to a multiple of N so that batch
    divisibility does not hide a memory answer.
    """
    n = req.gpus
    batch = -(-max(req.global_batch, n) // n) * n
    recompute: Recompute = req.pins.recompute or "full"
    least = req.replace(
        global_batch=batch,
        pins=req.pins.__class__(**{**req.pins.to_dict(), "micro_batch": 1, "recompute": recompute}),
    )
    for dp, tp, pp in meshes(least):
        if mesh_problem(least, dp, tp, pp):
            continue
        zero = next((z for z in (3, 2, 1, 0) if least.zero_allowed(z, pp)), None)
        if zero is None:
            continue
        try:
            layout = Layout(
                dp=dp,
                tp=tp,
                pp=pp,
                zero_stage=zero,
                micro_batch=1,
                grad_accum=batch // dp,
                recompute=recompute,
                sequence_parallel=tp > 1,
            )
        except LayoutError:
            continue
        if estimate(least, layout).fits:
            return layout
    return None


def min_gpus(req: PlanRequest, limit: int = 2**20) -> tuple[int | None, Layout | None]:
    """Smallest GPU count (1..G, then multiples of G) on which some layout fits in memory.

    Exponential search over node multiples, then a linear scan back; see :func:`fits_somewhere`.

    Example: a 100B-parameter model on 80 GiB GPUs (see benchmarks/planner.py for the numbers).
    """
    g = req.node_size if req.gpus_per_node else req.gpu_spec.gpus_per_node
    for n in range(1, g + 1):
        layout = fits_somewhere(req.replace(gpus=n, gpus_per_node=g))
        if layout:
            return n, layout
    hi = 2 * g
    while hi <= limit and not fits_somewhere(req.replace(gpus=hi, gpus_per_node=g)):
        hi *= 2
    if hi > limit:
        return None, None
    lo_nodes, hi_nodes = hi // (2 * g), hi // g
    while hi_nodes - lo_nodes > 1:
        mid = (lo_nodes + hi_nodes) // 2
        if fits_somewhere(req.replace(gpus=mid * g, gpus_per_node=g)):
            hi_nodes = mid
        else:
            lo_nodes = mid
    n = hi_nodes * g
    return n, fits_somewhere(req.replace(gpus=n, gpus_per_node=g))
