"""Step time of a layout: compute, recomputation, tensor/pipeline/data-parallel communication, bubble.

Compute runs at ``efficiency × peak`` (hardware FLOPs, i.e. including recomputation); the
efficiency is an achievable fraction of peak fitted to published runs (:mod:`.calibrate`).
Communication uses ring collectives (Patarasuk & Yuan 2009: an all-reduce moves
``2(n-1)/n`` of the buffer per GPU, a reduce-scatter or all-gather ``(n-1)/n``). The pipeline
bubble is ``(p-1)/(v·m)`` of the ideal time (Narayanan et al. SC21 §2.2, Llama 3 §3.3.2).
"""

from __future__ import annotations

from dataclasses import dataclass

from mla.config import ModelConfig
from orchestrator.planner.memory import (
    LOW_BYTES,
    REDUCE_BUCKET_ELEMENTS,
    attention_flops_per_token,
    layer_parameters,
    layers_on_stage,
    stage_parameters,
)

#: Achievable fraction of dense peak for hardware FLOPs, fitted by ``benchmarks/planner.py`` on
#: the published rows of published_layouts.csv (``calibrate.fit_efficiency``: 0.532 after the
#: framework constraints and overlap flags; 0.59 before).
DEFAULT_EFFICIENCY = 0.53
#: Bytes of memory traffic per token and layer of the element-wise kernels (norms, activation,
#: residual adds, rotary, softmax bookkeeping), in units of the hidden size h: about three read or
#: write passes, forward and backward, over the ~34·h bytes Korthikanti et al. count per token.
ELEMENTWISE_BYTES_PER_H = 200
#: Share of :data:`ELEMENTWISE_BYTES_PER_H` on tensors every tensor-parallel rank holds whole
#: unless sequence parallelism splits them (norm inputs, residual stream): Korthikanti et al. 2022
#: §4.2 count 10 of the 34 bytes per sbh of a layer's activations as replicated.
REPLICATED_ELEMENTWISE_SHARE = 10 / 34
#: Latency of one send or one ring step, seconds (NCCL small-message latency, order 5-10 µs); a
#: ring collective over n GPUs takes ``factor·(n-1)`` steps (Patarasuk & Yuan 2009).
COLLECTIVE_LATENCY_S = 5e-6


@dataclass(frozen=True)
class StepTime:
    """Seconds per optimizer step, by cause; ``total`` is their sum."""

    compute_s: float
    recompute_s: float
    tp_comm_s: float
    bubble_s: float
    p2p_s: float
    dp_comm_s: float

    @property
    def total(self) -> float:
        """Step time, seconds."""
        return (
            self.compute_s
            + self.recompute_s
            + self.tp_comm_s
            + self.bubble_s
            + self.p2p_s
            + self.dp_comm_s
        )

    def to_dict(self) -> dict:
        """Parts in seconds (6 significant digits)."""
        return {
            k: float(f"{getattr(self, k):.6g}")
            for k in ("compute_s", "recompute_s", "tp_comm_s", "bubble_s", "p2p_s", "dp_comm_s")
        }


def stage_flops_per_token(
    cfg: ModelConfig, seq_len: int, pp: int, recompute: str
) -> tuple[float, float]:
    """``(model, extra)`` training FLOPs per token on the slowest pipeline stage.

    A layer costs ``6·P_layer`` + its share of the PaLM attention term; the output head
    ``6·V·d`` sits on the last stage. Full recompute adds one forward of every layer (1/3 of its
    training FLOPs); selective recompute adds the attention term once more, Korthikanti et al.
    2022 §5's hardware FLOPs ``72·B·s·L·h²·(1 + s/3h + V/12hL)`` against model FLOPs
    ``(1 + s/6h + V/12hL)`` (this reproduces their printed HFU, formulas.md §5 check 4).

    Example: GPT-3 175B, s=2048, pp=1, full → extra = (96·(6·12h²·…) + attn)/3 ≈ 1/3 of model.
    """
    attn = attention_flops_per_token(cfg, seq_len) / cfg.n_layers
    layer = 6.0 * layer_parameters(cfg) + attn
    head = 6.0 * cfg.vocab_size * cfg.d_model
    first, last = layers_on_stage(cfg.n_layers, pp, 0), layers_on_stage(cfg.n_layers, pp, pp - 1)
    first_cost = first * layer + (head if pp == 1 else 0.0)
    last_cost = last * layer + head
    n, model = (first, first_cost) if first_cost >= last_cost else (last, last_cost)
    extra = {"none": 0.0, "selective": n * attn, "full": n * layer / 3}[recompute]
    return model, extra


def ring_time(nbytes: float, n: int, bandwidth_gbs: float, factor: float, pieces: int = 1) -> float:
    """Seconds for ring collectives moving ``factor·(n-1)/n·nbytes`` per GPU at ``bandwidth_gbs``,
    issued as ``pieces`` collectives (buckets or layers) of ``factor·(n-1)`` latency steps each.

    ``factor`` is 2 for all-reduce, 1 for reduce-scatter or all-gather.

    Example: all-reduce of 1 GB over 8 GPUs at 25 GB/s, one piece → 2·7/8·1e9/25e9 + 14·5 µs
    = 0.07007 s.
    """
    if n <= 1:
        return 0.0
    return (
        factor * (n - 1) / n * nbytes / (bandwidth_gbs * 1e9)
        + pieces * factor * (n - 1) * COLLECTIVE_LATENCY_S
    )


def elementwise_time_per_token(
    cfg: ModelConfig, pp: int, tp: int, gpu, sequence_parallel: bool = True, kernel=None
) -> float:
    """Seconds per token of memory-bound element-wise work on the slowest stage.

    ``layers · bytes / HBM bandwidth`` with ``ELEMENTWISE_BYTES_PER_H · h`` bytes per token and
    layer: a matmul does ``72h²`` FLOPs per token and layer but the element-wise kernels move
    ``∝ h`` bytes, so small models reach a lower fraction of peak (the roofline argument,
    Williams et al. 2009). Tensor parallelism splits the share on split tensors; the
    :data:`REPLICATED_ELEMENTWISE_SHARE` (norms, residuals) and an unfused norm's extra traffic
    (``kernel.norm_traffic_bytes_per_h``) are split only with sequence parallelism.

    Example: h=2048, 24 layers, tp=1, H100 (3.35 TB/s): 24·200·2048/3.35e12 = 2.9 µs per token,
    about 24% of the matmul time at 60% of 989 TF/s.
    """
    layers = layers_on_stage(cfg.n_layers, pp, 0)
    replicated_tp = tp if sequence_parallel else 1
    share = REPLICATED_ELEMENTWISE_SHARE
    per_h = ELEMENTWISE_BYTES_PER_H * ((1 - share) / tp + share / replicated_tp)
    if kernel is not None:
        per_h += kernel.norm_traffic_bytes_per_h / replicated_tp
    return layers * per_h * cfg.d_model / (gpu.hbm_tbs * 1e12)


def attention_kernel_time_per_token(
    cfg: ModelConfig, seq_len: int, layout, gpu, rate: float, kernel
) -> float:
    """Seconds per token the attention kernel adds beyond GEMM-rate attention FLOPs.

    A kernel at ``attention_speed`` < 1 (FlashAttention-1) spends ``1/speed - 1`` more on the
    attention FLOPs (PaLM's ``12·L·H·hd·T``); a non-flash kernel moves ``score_bytes`` per score
    element through HBM, ``H·T`` scores per token and layer, split over tensor-parallel ranks by
    heads (:mod:`.kernels`); full recompute repeats the forward third of both.

    Example: 13B (40 heads) at 8k, torch kernel (36 B), tp=4, 10 layers, A100-80GB 2.039 TB/s:
    10 · 36 · 40·8192/4 / 2.039e12 = 14.5 µs per token.
    """
    if kernel is None:
        return 0.0
    layers = layers_on_stage(cfg.n_layers, layout.pp, 0)
    again = 4 / 3 if layout.recompute == "full" else 1.0
    attn = attention_flops_per_token(cfg, seq_len) / cfg.n_layers * layers
    slow = attn * (1 / kernel.attention_speed - 1) / rate
    scores = cfg.n_heads * seq_len / layout.tp * layers * kernel.score_bytes / (gpu.hbm_tbs * 1e12)
    return again * (slow + scores)


def tp_comm_per_micro_batch(
    cfg: ModelConfig,
    seq_len: int,
    layout,
    precision: str,
    gpu,
    overlap: bool = False,
    link_fraction: float = 1.0,
) -> float:
    """Exposed tensor-parallel communication of one micro-batch on one stage, seconds.

    Megatron: 2 all-reduces of the ``(s, b, h)`` activation per layer forward, 2 backward, 2 more
    with full recompute, i.e. ``8·b·s·h·(t-1)/t`` elements per layer and micro-batch (Narayanan
    et al. SC21 §3.2; Korthikanti §5; sequence parallelism swaps each for an all-gather plus a
    reduce-scatter of the same total volume). Over the intra-node link, not overlapped, unless
    ``overlap`` (Megatron-Core ``--tp-comm-overlap``, PyTorch async TP): each collective is then
    decomposed into ``t`` chunks pipelined with the chunks of its GEMM, and only one chunk in
    ``t`` stays exposed (Wang et al., ASPLOS'23, "Overlap communication with dependent
    computation via decomposition", §3). ``link_fraction`` is the achieved share of the link
    (:attr:`.constants.CostConstants.tp_link_fraction`).

    Example: h=12288, s=2048, b=1, bf16, t=8, 12 layers, A100 (300 GB/s): 48 · 2·7/8·50.3 MB /
    300 GB/s = 14.1 ms; with ``overlap`` 14.1/8 = 1.76 ms.
    """
    if layout.tp == 1:
        return 0.0
    n = 4 + (2 if layout.recompute == "full" else 0)
    nbytes = LOW_BYTES[precision] * seq_len * layout.micro_batch * cfg.d_model
    layers = layers_on_stage(cfg.n_layers, layout.pp, 0)
    total = n * layers * ring_time(nbytes, layout.tp, gpu.intra_node_gbs * link_fraction, 2)
    return total / layout.tp if overlap else total


def p2p_time(
    cfg: ModelConfig, seq_len: int, layout, precision: str, gpu, gpus_per_node: int
) -> float:
    """Pipeline sends per step, seconds: an activation forward and a gradient backward per
    micro-batch and model chunk, ``2·s·b·h`` bytes (``/t`` with Megatron's scatter-gather).

    Neighbouring stages are ``dp·tp`` ranks apart (``orchestrator.contract.layout`` rank order), so they talk
    over the network once ``dp·tp >= gpus_per_node``.

    Example: h=12288, s=2048, b=1, t=8, m=64, v=1, 25 GB/s: 2·64·6.3 MB/25 GB/s = 32 ms.
    """
    if layout.pp == 1:
        return 0.0
    nbytes = LOW_BYTES[precision] * seq_len * layout.micro_batch * cfg.d_model / layout.tp
    bw = gpu.inter_node_gbs if layout.dp * layout.tp >= gpus_per_node else gpu.intra_node_gbs
    sends = 2 * layout.grad_accum * layout.virtual_stages
    return sends * (nbytes / (bw * 1e9) + COLLECTIVE_LATENCY_S)


def dp_comm_exposed(
    cfg: ModelConfig,
    layout,
    precision: str,
    gpu,
    gpus_per_node: int,
    forward_s: float,
    backward_s: float,
    overlap: bool = True,
    overlap_param_gather: bool = False,
) -> float:
    """Data-parallel traffic not hidden behind compute, seconds per step.

    ``forward_s`` and ``backward_s`` are one micro-batch's forward and backward compute on the
    slowest stage (backward includes recomputation). ZeRO §7 volumes per GPU shard of Ψ
    parameters (Rajbhandari et al. 2020): stage 0/1 all-reduce the gradients once per step
    (stage 1 as reduce-scatter + parameter all-gather, same volume); stage 2 reduce-scatters every
    micro-batch (DeepSpeed cannot keep full gradients) and all-gathers parameters once; stage 3
    all-gathers the parameters in forward AND again in backward and reduce-scatters gradients,
    every micro-batch, layer by layer: 1.5x the volume of stages 0-2.

    Overlap: gradient reduction hides behind the last micro-batch's backward; the step-end
    parameter all-gather of stages 1-2 is exposed, unless ``overlap_param_gather`` (Megatron
    ``--overlap-param-gather``) hides it behind the next forward. ZeRO-3's forward gather can
    only hide behind forward compute and its backward gather + reduce-scatter behind backward
    compute, per phase; the first layer's gather and the last layer's reduce-scatter have nothing
    to hide behind (prefetch is one layer ahead, Zhao et al. 2023, PyTorch FSDP, §3.3-3.4). With
    small micro-batches on many GPUs ZeRO-3 is therefore communication-bound. ``overlap=False``
    (Megatron-LM before ``--overlap-grad-reduce``, 2021-2022) exposes all of it. The group spans
    nodes (inter-node link) when ``dp·tp > gpus_per_node``.

    Example: Ψ=1.7e9 (stage 0, fp16), dp=32, 25 GB/s, backward 0.5 s: all-reduce
    2·31/32·3.4e9/25e9 = 0.26 s, fully hidden → 0 s. ZeRO-3 with Ψ=8e9 bf16, dp=64, 25 GB/s,
    32 layers, forward 1 s, backward 2 s: one gather 63/64·16e9/25e9 = 0.63 s hides in both
    phases; exposed 2·0.63/32 = 0.04 s per micro-batch.
    """
    if layout.dp == 1:
        return 0.0
    psi = stage_parameters(cfg, layout.tp, layout.pp, 0)
    nbytes = LOW_BYTES[precision] * psi
    bw = gpu.inter_node_gbs if layout.dp * layout.tp > gpus_per_node else gpu.intra_node_gbs
    m = layout.grad_accum
    if layout.zero_stage == 3:
        layers = layers_on_stage(cfg.n_layers, layout.pp, 0)
        gather = ring_time(nbytes, layout.dp, bw, 1, layers)
        if not overlap:
            return m * 3 * gather
        edges = 2 * gather / layers
        return m * (max(0.0, gather - forward_s) + max(0.0, 2 * gather - backward_s) + edges)
    buckets = max(1, round(psi / REDUCE_BUCKET_ELEMENTS))
    one = ring_time(nbytes, layout.dp, bw, 1, buckets)
    grads_window = backward_s if overlap else 0.0
    gather = max(0.0, one - forward_s) if (overlap and overlap_param_gather) else one
    if layout.zero_stage == 0:
        return max(0.0, 2 * one - grads_window)
    if layout.zero_stage == 1:
        return max(0.0, one - grads_window) + gather
    return m * max(0.0, one - grads_window) + gather


def step_time(
    cfg: ModelConfig,
    seq_len: int,
    layout,
    precision: str,
    gpu,
    gpus_per_node: int,
    efficiency: float = DEFAULT_EFFICIENCY,
    overlap: bool = True,
    overlap_param_gather: bool = False,
    overlap_tp: bool = False,
    kernel=None,
    constants=None,
) -> StepTime:
    """Seconds per optimizer step of ``layout`` (see the module docstring).

    Per micro-batch the slowest stage computes ``stage_flops·b·s / (t · eff · peak)`` plus
    element-wise and attention-kernel time; a step is ``m`` of them plus the bubble ``(p-1)/v``
    micro-batch slots, tensor-parallel communication, pipeline sends and exposed data-parallel
    traffic. The overlap flags are :func:`dp_comm_exposed`'s and :func:`tp_comm_per_micro_batch`'s;
    ``kernel`` (:class:`.kernels.KernelSpec`) and ``constants`` (:class:`.constants.CostConstants`)
    add the kernel's costs and the fitted link share (``None``: as counted, flash kernels).

    Example: 1.7B GPT (24×2304), s=2048, b=16, m=1, dp=32, fp16 full recompute, A100 at eff 0.53:
    compute ≈ 16·2048·(6·1.7e9·4/3 …)/(0.53·312e12) ≈ 2.7 s per step.
    """
    model, extra = stage_flops_per_token(cfg, seq_len, layout.pp, layout.recompute)
    rate = layout.tp * efficiency * gpu.peak_flops(precision)
    tokens = layout.micro_batch * seq_len
    elementwise = (
        elementwise_time_per_token(
            cfg,
            layout.pp,
            layout.tp,
            gpu,
            layout.sequence_parallel if kernel is not None else True,
            kernel,
        )
        * tokens
    )
    attention = attention_kernel_time_per_token(cfg, seq_len, layout, gpu, rate, kernel) * tokens
    mb_model, mb_extra = model * tokens / rate + elementwise + attention, extra * tokens / rate
    link = constants.tp_link_fraction if constants is not None else 1.0
    mb_tp = tp_comm_per_micro_batch(cfg, seq_len, layout, precision, gpu, overlap_tp, link)
    m = layout.grad_accum
    bubble = (layout.pp - 1) / layout.virtual_stages * (mb_model + mb_extra + mb_tp)
    dp = dp_comm_exposed(
        cfg,
        layout,
        precision,
        gpu,
        gpus_per_node,
        mb_model / 3,
        2 * mb_model / 3 + mb_extra,
        overlap,
        overlap_param_gather,
    )
    return StepTime(
        compute_s=m * mb_model,
        recompute_s=m * mb_extra,
        tp_comm_s=m * mb_tp,
        bubble_s=bubble,
        p2p_s=p2p_time(cfg, seq_len, layout, precision, gpu, gpus_per_node),
        dp_comm_s=dp,
    )
