"""Evaluate one layout: structural checks, memory and step time → :class:`Estimate`."""

from __future__ import annotations

from mla.flops import training_flops_per_token
from orchestrator.contract.layout import Layout, tp_splits_heads
from orchestrator.planner.kernels import get_kernel
from orchestrator.planner.memory import memory_per_gpu
from orchestrator.planner.step_time import stage_flops_per_token, step_time
from orchestrator.planner.types import Estimate, PlanRequest


def mesh_problem(req: PlanRequest, dp: int, tp: int, pp: int) -> str:
    """Why the degrees ``dp × tp × pp`` cannot run this model and batch ('' if they can).

    Example: 16 GPUs per 8-GPU node, tp=16 → ``"tp=16 > 8 GPUs per node"``.
    """
    cfg = req.model
    if tp > req.node_size:
        return f"tp={tp} > {req.node_size} GPUs per node"
    if req.node_size % tp:
        return f"tp={tp} does not divide {req.node_size} GPUs per node (tensor groups would straddle nodes)"
    if not tp_splits_heads(tp, cfg.n_heads, cfg.kv_heads):
        return f"tp={tp} does not divide heads={cfg.n_heads} and kv_heads={cfg.kv_heads}"
    if pp > cfg.n_layers:
        return f"pp={pp} > layers={cfg.n_layers}"
    if req.global_batch % dp:
        return f"global batch {req.global_batch} is not divisible by dp={dp}"
    return ""


def layout_problem(req: PlanRequest, layout: Layout) -> str:
    """Why ``layout`` cannot run ('' if it can): mesh, micro-batch and interleaving rules.

    Interleaving needs whole layers per model chunk (``L % (p·v) == 0``) and, as Megatron's
    interleaved schedule, a micro-batch count divisible by ``p``.
    """
    problem = mesh_problem(req, layout.dp, layout.tp, layout.pp)
    if problem:
        return problem
    if layout.global_batch != req.global_batch:
        return (
            f"dp({layout.dp}) * micro_batch({layout.micro_batch}) * grad_accum({layout.grad_accum}) "
            f"= {layout.global_batch} != global batch {req.global_batch}"
        )
    if layout.virtual_stages > 1:
        if req.model.n_layers % (layout.pp * layout.virtual_stages):
            return (
                f"virtual_stages={layout.virtual_stages} with pp={layout.pp}: layers={req.model.n_layers} "
                f"not divisible by pp*virtual_stages={layout.pp * layout.virtual_stages}"
            )
        if layout.grad_accum % layout.pp:
            return f"interleaving needs micro-batches({layout.grad_accum}) divisible by pp({layout.pp})"
    return ""


def estimate(req: PlanRequest, layout: Layout) -> Estimate:
    """Memory and speed of ``layout`` for ``req`` (no structural checks: see layout_problem).

    tokens/s = ``B·s / step``; model TFLOP/s per GPU = ``flops_per_token · tokens/s / N``
    (:func:`mla.flops.training_flops_per_token`); MFU = that / peak (PaLM App. B);
    hardware FLOPs add recomputation on the slowest stage.

    Example: tiny preset on 2 CPU workers, dp=2, ZeRO-2, mb=8, B=32, s=256 → ~1.08 GiB per worker.
    """
    cfg, seq, kernel = req.model, req.seq_tokens, get_kernel(req.kernel)
    memory = memory_per_gpu(
        cfg,
        seq,
        layout,
        req.precision,
        req.flash_attention,
        req.fp32_main_grads,
        kernel,
        req.constants,
        req.fused_loss,
    )
    time = step_time(
        cfg,
        seq,
        layout,
        req.precision,
        req.gpu_spec,
        req.node_size,
        req.efficiency,
        req.overlap_dp,
        req.overlap_param_gather,
        req.overlap_tp,
        kernel,
        req.constants,
    )
    tokens_per_s = req.global_batch * seq / time.total
    peak = req.gpu_spec.peak_flops(req.precision)
    model_flops = training_flops_per_token(cfg, seq) * tokens_per_s / layout.world_size
    stage_model, stage_extra = stage_flops_per_token(cfg, seq, layout.pp, layout.recompute)
    hardware = model_flops * (1 + stage_extra / stage_model)
    limit = req.gpu_spec.memory_gib * req.constants.usable_memory_fraction
    return Estimate(
        memory=memory,
        memory_limit_gib=limit,
        time=time,
        tokens_per_s=tokens_per_s,
        tflops_per_gpu=model_flops / 1e12,
        hardware_tflops_per_gpu=hardware / 1e12,
        mfu=model_flops / peak,
        hfu=hardware / peak,
        step_time_band=req.constants.step_time_band,
    )
