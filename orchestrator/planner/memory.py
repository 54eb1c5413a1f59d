"""Memory per GPU: parameters, gradients, optimizer state, activations and buffers.

Model states follow ZeRO (Rajbhandari et al. 2020, arXiv:1910.02054, §3.1/§5) with the byte
counts of DeepSpeed's own estimators (``estimate_zero2_model_states_mem_needs``,
``estimate_zero3_model_states_mem_needs``, formulas.md §2), which the runtime uses. Activations
follow Korthikanti et al. 2022 (arXiv:2205.05198, §4, eqs. 1-6 / Table 2), generalised to
grouped-query attention, SwiGLU width, no dropout, FlashAttention and the MLA attention's own
tensors. All results are in bytes unless a name says ``gib``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from mla import flops
from mla.config import ModelConfig
from orchestrator.contract.layout import padded_vocab_size

#: ``mla.flops`` counts, memoised per (frozen, hashable) model config: a 4,096-GPU search asks
#: for the same model's counts thousands of times.
layer_parameters = functools.lru_cache(maxsize=256)(flops.layer_parameters)
attention_flops_per_token = functools.lru_cache(maxsize=256)(flops.attention_flops_per_token)

GIB = 2**30
LOW_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
#: Fixed per-process memory not counted elsewhere: CUDA context, cuBLAS/NCCL workspaces (GiB).
RUNTIME_OVERHEAD_GIB = 1.0
#: DeepSpeed's default ``reduce_bucket_size`` (elements) for ZeRO 1/2 gradient buckets.
REDUCE_BUCKET_ELEMENTS = 5e8


@dataclass(frozen=True)
class MemoryBreakdown:
    """Bytes per GPU on the most loaded pipeline stage.

    Example:
        >>> MemoryBreakdown(2 * GIB, 2 * GIB, 12 * GIB, 3 * GIB, 1 * GIB).gib()["total"]
        20.0
    """

    parameters: float
    gradients: float
    optimizer: float
    activations: float
    buffers: float

    @property
    def total(self) -> float:
        """Sum of the parts, bytes."""
        return self.parameters + self.gradients + self.optimizer + self.activations + self.buffers

    def gib(self) -> dict:
        """Parts and ``total`` in GiB, rounded to 0.01."""
        parts = {
            k: getattr(self, k)
            for k in ("parameters", "gradients", "optimizer", "activations", "buffers")
        }
        return {
            **{k: round(v / GIB, 2) for k, v in parts.items()},
            "total": round(self.total / GIB, 2),
        }

    def largest_part(self) -> tuple[str, float]:
        """``(name, bytes)`` of the biggest part."""
        return max(
            (
                (k, getattr(self, k))
                for k in ("parameters", "gradients", "optimizer", "activations", "buffers")
            ),
            key=lambda kv: kv[1],
        )


def zero_paper_bytes(psi: float, stage: int, nd: int, k: int = 12) -> float:
    """Model-state bytes per GPU exactly as the ZeRO paper counts them (§3.1, Fig. 1).

    Baseline ``(2+2+K)Ψ``; P_os ``4Ψ + KΨ/N_d``; P_os+g ``2Ψ + (2+K)Ψ/N_d``; P_os+g+p
    ``(4+K)Ψ/N_d``; K = 12 for mixed-precision Adam.

    Example (the paper's Ψ = 7.5B, N_d = 64): 120e9, 31.4e9, 16.6e9, 1.9e9 bytes for stages 0-3.
    """
    shards = {0: (1, 1, 1), 1: (1, 1, nd), 2: (1, nd, nd), 3: (nd, nd, nd)}[stage]
    return 2 * psi / shards[0] + 2 * psi / shards[1] + k * psi / shards[2]


def model_state_bytes(
    psi: float, stage: int, dp: int, precision: str, fp32_main_grads: bool = False
) -> tuple[float, float, float]:
    """``(parameters, gradients, optimizer)`` bytes per GPU for ``psi`` parameters on this GPU.

    Mixed precision (bf16/fp16) as DeepSpeed allocates it: 2-byte parameters, 2-byte gradients,
    a 4-byte fp32 gradient copy and 12-byte Adam state (fp32 master weights, momentum, variance).
    ZeRO-1 shards optimizer state and the fp32 gradient copy over ``dp``; ZeRO-2 also the 2-byte
    gradients; ZeRO-3 also the parameters, and its 2-byte gradients live only in the reduce
    buckets (DeepSpeed's estimator counts ``18Ψ/N``). fp32 training: 4-byte parameters and
    gradients, 8-byte Adam moments, no extra copies. Stage 0 mixed precision costs 20 B/param
    (Megatron-LM README "Distributed Optimizer" table: 20, and ``4 + 16/d`` for ZeRO-1).

    ``fp32_main_grads`` is Megatron-LM's bf16 layout (README "Distributed Optimizer" table, bf16
    row: 18 B/param, ``6 + 12/d`` distributed): gradients accumulate and are reduced in an fp32
    ``main_grad`` buffer that the distributed optimizer does not shard, and there is no separate
    2-byte gradient. It applies to bf16 only (Megatron's fp16 row is DeepSpeed's 20 / 4 + 16/d).

    Example: Ψ = 7.5e9, ZeRO-2, dp = 64, bf16 → (15e9, 2.11e9, 1.41e9): total 2Ψ + 18Ψ/64 =
    17.11e9 B, DeepSpeed's ``estimate_zero2_model_states_mem_needs`` without offload. With
    ``fp32_main_grads``, ZeRO-1, dp = 8: (15e9, 30e9, 11.25e9) = (6 + 12/8)·Ψ.
    """
    if precision == "fp32":
        p_b, g_b, fp32_grad, opt = 4, 4, 0, 8
    else:
        p_b, g_b, fp32_grad, opt = 2, 2, 4, 12
    if fp32_main_grads and precision == "bf16":
        g_b, fp32_grad = 4, 0
    elif stage == 3 and precision != "fp32":
        g_b = 0  # mixed precision: the fp32 gradient partition (fp32_grad) is what remains
    params = p_b * psi / (dp if stage >= 3 else 1)
    grads = g_b * psi / (dp if stage >= 2 else 1) + fp32_grad * psi / (dp if stage >= 1 else 1)
    return params, grads, opt * psi / (dp if stage >= 1 else 1)


def activation_bytes_per_layer(
    cfg: ModelConfig,
    seq_len: int,
    micro_batch: int,
    tp: int = 1,
    *,
    sequence_parallel: bool = False,
    recompute: str = "none",
    flash: bool = True,
    norm_bytes: float = 0.0,
) -> float:
    """Activation bytes one transformer block keeps for backward, per GPU (16-bit activations).

    Korthikanti et al. 2022 §4.1 count ``sbh·(34 + 5as/h)`` bytes per layer: attention 11sbh +
    5as²b, MLP 19sbh, two LayerNorms 4sbh. Here, per sbh: 10 are replicated across tensor-parallel
    ranks unless sequence parallelism splits them (two norm inputs 4, QKV input 2, MLP input 2,
    two dropout masks 2 when ``cfg.dropout > 0``); the rest is split by ``tp``: Q 2, K and V
    ``4·kv/a`` (GQA shrinks them), attention output 2, SwiGLU ``6·ffn/h`` (gate and up outputs and
    their product; ``ffn = 8h/3`` gives GPT's 16). Dense score storage ``as²b·(2 + 3 if dropout)``
    is dropped by FlashAttention (``flash``) or selective recompute. MLA adds
    :func:`mla_attention_bytes` (its block-selection core; selective recompute keeps the gate). Full recompute keeps only the
    block input, ``2sbh`` (``/tp`` with sequence parallelism). ``norm_bytes`` adds the replicated
    per-sbh bytes of unfused RMSNorms (:attr:`.kernels.KernelSpec.norm_activation_bytes`: 16).

    Example (Korthikanti's GPT-3 175B, s=2048, h=12288, a=96, ffn=32768, dropout, no flash, b=1,
    t=8): none 0.58e9 B (TP only), 0.36e9 (TP+SP), selective+SP 0.107e9, full 0.050e9.
    """
    s, b, h, a = seq_len, micro_batch, cfg.d_model, cfg.n_heads
    sbh = s * b * h
    if recompute == "full":
        return 2 * sbh / (tp if sequence_parallel else 1)
    masks = 2 if cfg.dropout > 0 else 0
    replicated = (8 + masks + norm_bytes) * sbh
    split = (4 + 4 * cfg.kv_heads / a + 6 * cfg.ffn_hidden / h) * sbh
    if recompute == "none" and cfg.attention == "dense" and not flash:
        split += a * s * s * b * (5 if masks else 2)
    if cfg.attention == "mla":
        split += mla_attention_bytes(cfg, seq_len, micro_batch, recompute)
    return replicated / (tp if sequence_parallel else 1) + split / tp


def layout_activation_bytes(
    cfg: ModelConfig,
    seq_len: int,
    layout,
    flash: bool,
    norm_bytes: float,
    recompute: str = "none",
) -> float:
    """:func:`activation_bytes_per_layer` with a layout's micro-batch, tp and sequence
    parallelism; ``recompute`` defaults to none (one layer's complete activations).

    Example: as :func:`activation_bytes_per_layer`, whose numbers it returns unchanged.
    """
    return activation_bytes_per_layer(
        cfg,
        seq_len,
        layout.micro_batch,
        layout.tp,
        sequence_parallel=layout.sequence_parallel,
        recompute=recompute,
        flash=flash,
        norm_bytes=norm_bytes,
    )


def mla_attention_bytes(
    cfg: ModelConfig,
    seq_len: int,
    micro_batch: int,
    recompute: str = "none",
    backend: str | None = None,
) -> float:
    """Activation bytes one MLA attention core keeps for backward, all heads (``/tp`` per shard),
    beyond its inputs q, k, v (counted by :func:`activation_bytes_per_layer`), 16-bit elements.

    Counted from what autograd saves in ``mla/attention.py:multi_level_attention`` (checked
    against ``torch.autograd.graph.saved_tensors_hooks`` in ``tests/test_planner_memory.py``).
    ``b`` micro-batch, ``s`` tokens, ``H`` heads of ``hd`` features, ``kv`` key/value heads, ``B``
    block, ``w`` window, ``n_sel = ceil(global_k / B)``:

    * mix (``mix="gate"``): both branch outputs ``2·b·H·hd`` per token each (over the padded
      lengths ``S``, ``S_l`` of the blocked path), ``1 - g`` ``2·b·H·s`` and the sigmoid gate
      ``2·b·s·H`` (the only term selective recompute keeps);
    * ``backend="flex"`` (CUDA, ``B % 128 == 0``, ``mla/flex_attention.py``): two FlexAttention
      calls, each saving its output (the mix's) and an fp32 logsumexp ``4·b·H·s``;
    * ``backend="blocked"`` (``mla/global_attention.py:block_selection_attention`` and
      ``mla/local_attention.py:blocked_local_attention``, the path elsewhere), over ``S = nb·B``
      padded tokens: global branch, per query block its ``m + 1`` key blocks
      (``m = min(n_sel, nb - 1)``), the scaled queries ``2·b·H·S·hd``, the gathered keys and
      values ``4·b·H·S·(m+1)·hd`` (gathered per kv head, but the grouped matmul saves them
      broadcast over the ``H / kv`` query heads), the probabilities ``2·b·H·S·(m+1)·B`` and the gather's
      int64 indices ``16·b·kv·nb·(m+1)``; local branch with ``p = min(B, s)``,
      ``n_prev = ceil((min(w, s) - 1) / p)`` and ``S_l = ceil(s / p)·p``: scaled queries
      ``2·b·H·S_l·hd``, key and value windows ``4·b·H·S_l·(n_prev+1)·hd`` (kv heads repeated)
      and probabilities ``2·b·H·S_l·(n_prev+1)·p``.

    ``indexer="exact"`` (reference option, ``mla/global_attention.py:exact_topk_attention``)
    keeps the gathered keys and values ``(b, H, s, k, hd)``, the softmax ``(b, H, s, k)``, int64
    indices and a mask, ``b·H·s·k·(4·hd + 11)``, plus the mix. Selective recompute reruns the core
    and keeps the gate only. ``backend=None`` picks flex when ``B % 128 == 0`` (as
    ``mla.flex_attention.flex_backend`` does on CUDA), else blocked.

    Example (tiny: b=8, s=256, H=4, kv=4, hd=32, B=32, w=32, k=8, so m = n_prev = 1, blocked):
    global 524,288 + 524,288 (output) + 2,097,152 + 1,048,576 + 8,192; local 524,288 + 524,288
    (output) + 2,097,152 + 1,048,576; mix 16,384 + 16,384: 8,429,568 bytes.
    """
    b, s, heads, hd, kv = micro_batch, seq_len, cfg.n_heads, cfg.head_dim, cfg.kv_heads
    gated = cfg.mix == "gate"
    gate = 2 * b * s * heads if gated else 0
    if recompute == "selective":
        return gate
    mix = 2 * b * heads * s if gated else 0  # 1 - g; the branch outputs are added below
    if cfg.indexer == "exact":
        k = min(cfg.global_k, s)
        return (
            b * heads * s * k * (4 * hd + 11)
            + (4 * b * heads * s * hd if gated else 0)
            + mix
            + gate
        )
    block = cfg.block_size
    if (backend or ("flex" if block % 128 == 0 else "blocked")) == "flex":
        outputs = 4 * b * heads * s * hd if gated else 0
        return 2 * 4 * b * heads * s + outputs + mix + gate
    nb = -(-s // block)
    m = min(-(-cfg.global_k // block), nb - 1)
    padded = nb * block
    global_branch = (
        2 * b * heads * padded * hd * (2 if gated else 1)
        + 4 * b * heads * padded * (m + 1) * hd
        + 2 * b * heads * padded * (m + 1) * block
        + 16 * b * kv * nb * (m + 1)
    )
    p = min(block, s)
    n_prev = -(-(min(cfg.local_window, s) - 1) // p)
    padded_local = -(-s // p) * p
    local_branch = (
        2 * b * heads * padded_local * hd * (2 if gated else 1)
        + 4 * b * heads * padded_local * (n_prev + 1) * hd
        + 2 * b * heads * padded_local * (n_prev + 1) * p
    )
    return global_branch + local_branch + mix + gate


def layers_on_stage(n_layers: int, pp: int, stage: int) -> int:
    """Layers on pipeline ``stage``: ``n_layers // pp``, one more on the first ``n_layers % pp``.

    This is the documented uneven split of ``orchestrator.contract.layout.Layout.check_model``.

    Example: 126 layers on 16 stages → stages 0-13 hold 8, stages 14-15 hold 7.
    """
    return n_layers // pp + (1 if stage < n_layers % pp else 0)


def stage_parameters(cfg: ModelConfig, tp: int, pp: int, stage: int) -> float:
    """Parameters held by one GPU of ``stage`` (tensor shards; norms replicated).

    The embedding ``V·d`` (vocabulary-parallel, ``/tp``, V padded to a multiple of tp) sits on
    the first stage; the tied output head needs its own copy on the last stage when ``pp > 1``
    (Megatron's shared embedding).

    Example: 70b preset (80 layers of 855.6M), tp=8, pp=4, stage 0: 20·(855.6M - 16,384)/8 +
    20·16,384 + 32000·8192/8 = 2.17e9.
    """
    per_layer = layer_parameters(cfg)
    norms = 2 * cfg.d_model
    n = layers_on_stage(cfg.n_layers, pp, stage)
    params = n * ((per_layer - norms) / tp + norms)
    if stage == 0 or stage == pp - 1:
        params += padded_vocab_size(cfg.vocab_size, tp) * cfg.d_model / tp
    if stage == pp - 1:
        params += cfg.d_model
    return params


def in_flight_micro_batches(pp: int, stage: int, grad_accum: int, virtual_stages: int = 1) -> float:
    """Micro-batches whose activations ``stage`` holds at the peak of a 1F1B schedule.

    Stage i of p holds ``min(p - i, m)`` (Narayanan et al. SC21 §2.2.1); the interleaved schedule
    multiplies the first stage's load by ``1 + (p-1)/(p·m)`` (Korthikanti et al. 2022 §4.2.3).

    Example: p=8, m=64, v=2, stage 0 → 8·(1 + 7/512) = 8.11.
    """
    held: float = min(pp - stage, grad_accum)
    if virtual_stages > 1:
        held *= 1 + (pp - 1) / (pp * grad_accum)
    return held


def stage_activation_bytes(
    cfg: ModelConfig,
    seq_len: int,
    layout,
    stage: int,
    flash: bool = True,
    norm_bytes: float = 0.0,
    precision: str = "bf16",
) -> float:
    """Activation bytes of one GPU on pipeline ``stage`` at its peak.

    In-flight micro-batches × layers on the stage × :func:`activation_bytes_per_layer`; full
    recompute adds one layer's complete activations (the block being recomputed); the last stage
    adds the logits, 2 bytes saved plus 4 bytes for the fp32 softmax of the loss, ``6·s·b·V/t``.
    ``precision="fp32"`` stores every activation in 4 bytes: the 16-bit counts double and the
    logits take ``8·s·b·V/t``.

    Example: GPT-3 175B (above), tp=8, SP, selective, pp=8 (12 layers/stage), m=64, stage 0:
    8 · 12 · 0.107e9 = 10.3e9 B, i.e. "all 96 layers" on the first stage as Korthikanti notes.
    """
    per_layer = layout_activation_bytes(cfg, seq_len, layout, flash, norm_bytes, layout.recompute)
    held = in_flight_micro_batches(layout.pp, stage, layout.grad_accum, layout.virtual_stages)
    total = held * layers_on_stage(cfg.n_layers, layout.pp, stage) * per_layer
    if layout.recompute == "full":
        total += layout_activation_bytes(cfg, seq_len, layout, flash, norm_bytes)
    total *= LOW_BYTES[precision] / 2  # the counts above are for 16-bit activations
    if stage == layout.pp - 1:
        total += (
            (LOW_BYTES[precision] + 4)
            * seq_len
            * layout.micro_batch
            * padded_vocab_size(cfg.vocab_size, layout.tp)
            / layout.tp
        )
    return total


def buffer_bytes(cfg: ModelConfig, psi: float, layout, precision: str, gpu_name: str = "") -> float:
    """Runtime buffers: fixed overhead, the gradient reduce bucket and ZeRO-3 gathered layers.

    ``RUNTIME_OVERHEAD_GIB`` + ``low_bytes · min(Ψ, 5e8)`` (DeepSpeed's default reduce bucket) +
    for ZeRO-3 ``4 · largest layer`` (DeepSpeed ``estimate_zero3_model_states_mem_needs``'s
    ``largest_layer_memory``; the largest layer is the embedding or one MLP matrix, ``/tp``).

    Example: Ψ = 2.7e9 on a GPU, ZeRO-1, bf16 → 1 GiB + 2·5e8 B = 2.07e9 B.
    """
    low = LOW_BYTES[precision]
    total = RUNTIME_OVERHEAD_GIB * GIB + low * min(psi, REDUCE_BUCKET_ELEMENTS)
    if layout.zero_stage == 3:
        largest = max(cfg.vocab_size * cfg.d_model, cfg.d_model * cfg.ffn_hidden) / layout.tp
        total += 4 * largest
    return total


def calibrated_extra_bytes(
    cfg: ModelConfig,
    seq_len: int,
    layout,
    stage: int,
    flash: bool,
    norm_bytes: float,
    constants,
    fused_loss: bool = True,
) -> float:
    """Transient peak bytes the counted activations miss, with the fitted constants
    (:mod:`.constants`): ``transient_layers`` × one layer's full activations (the backward of
    one block: its ``(s, b, h)``-shaped tensors and their gradients, counted without ``s × s``
    scores only with a non-flash kernel) and, on the last
    stage, unless the loss is a fused vocab-parallel one (``fused_loss``, Megatron-LM's
    ``vocab_parallel_cross_entropy``, already counted as 6 B per logit ``/tp``),
    ``loss_bytes_per_logit · s·b·V`` for a plain full-vocabulary loss (not split by tp).

    Example: 13B at 8k, mb=4, tp=4, pp=4, last stage, flash, 6 layers and 24 B/logit:
    6 · 8192·4·5120·(8 + 4 + 4 + 6·2.7)/4 B + 24 · 8192·4·32000 B = 8.1e9 + 25.2e9 B.
    """
    layer = layout_activation_bytes(cfg, seq_len, layout, flash, norm_bytes)
    extra = constants.transient_layers * layer
    if stage == layout.pp - 1 and not fused_loss:
        extra += constants.loss_bytes_per_logit * seq_len * layout.micro_batch * cfg.vocab_size
    return extra


def stage_memory(
    cfg: ModelConfig,
    seq_len: int,
    layout,
    precision: str,
    stage: int,
    flash: bool = True,
    fp32_main_grads: bool = False,
    kernel=None,
    constants=None,
    fused_loss: bool = True,
) -> MemoryBreakdown:
    """Memory of one GPU on pipeline ``stage`` (see the module docstring for sources).

    ``kernel`` (:class:`.kernels.KernelSpec`) adds unfused-norm activations; ``constants``
    (:class:`.constants.CostConstants`) scales the counted activations by ``activation_scale``
    and adds :func:`calibrated_extra_bytes`. Without them the count is the papers' as is.
    """
    psi = stage_parameters(cfg, layout.tp, layout.pp, stage)
    params, grads, opt = model_state_bytes(
        psi, layout.zero_stage, layout.dp, precision, fp32_main_grads
    )
    norm = kernel.norm_activation_bytes if kernel is not None else 0.0
    act = stage_activation_bytes(cfg, seq_len, layout, stage, flash, norm, precision)
    if constants is not None:
        act = constants.activation_scale * act + calibrated_extra_bytes(
            cfg, seq_len, layout, stage, flash, norm, constants, fused_loss
        )
    return MemoryBreakdown(params, grads, opt, act, buffer_bytes(cfg, psi, layout, precision))


def memory_per_gpu(
    cfg: ModelConfig,
    seq_len: int,
    layout,
    precision: str,
    flash: bool = True,
    fp32_main_grads: bool = False,
    kernel=None,
    constants=None,
    fused_loss: bool = True,
) -> MemoryBreakdown:
    """Memory of the most loaded GPU: the larger of the first and the last pipeline stage.

    The first stage holds the embedding and the most in-flight micro-batches; the last holds the
    output head and the logits. Middle stages hold less than the first. ``kernel`` and
    ``constants`` as :func:`stage_memory`.

    Example: tiny preset, dp=2, ZeRO-2, micro-batch 8, seq 256, bf16 → about 1.08 GiB, of which
    1 GiB is the fixed runtime overhead (counted, no constants).
    """
    first = stage_memory(
        cfg, seq_len, layout, precision, 0, flash, fp32_main_grads, kernel, constants, fused_loss
    )
    if layout.pp == 1:
        return first
    last = stage_memory(
        cfg,
        seq_len,
        layout,
        precision,
        layout.pp - 1,
        flash,
        fp32_main_grads,
        kernel,
        constants,
        fused_loss,
    )
    return first if first.total >= last.total else last
