"""The parallel layout as data, and its rank arithmetic (pure Python, no torch).

The layout is the frozen dataclass that crosses from the planner (``orchestrator``) into every
Ray Train worker. Rank order follows Megatron-LM's ``RankGenerator`` and DeepSpeed's
``PipeModelDataParallelTopology`` (axes ``pipe, data, model``): the tensor-parallel rank varies
fastest, then the data-parallel rank, then the pipeline stage::

    rank = pp_rank * (dp * tp) + dp_rank * tp + tp_rank

Example (dp=2, tp=2, pp=2, 8 ranks): tensor groups [0,1] [2,3] [4,5] [6,7]; data groups
[0,2] [1,3] [4,6] [5,7]; pipeline groups [0,4] [1,5] [2,6] [3,7].
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal, get_args

Recompute = Literal["none", "selective", "full"]
#: The activation-recomputation choices, in order of memory saved (the one list of them).
RECOMPUTE_CHOICES: tuple[Recompute, ...] = get_args(Recompute)


#: ZeRO stages whose checkpoints are consolidated (layout-independent). ZeRO-3 checkpoints keep
#: DeepSpeed's own per-rank format, which loads under the layout that wrote it only.
LAYOUT_FREE_ZERO_STAGES = (0, 1, 2)


def tp_splits_heads(tp: int, n_heads: int, n_kv_heads: int) -> bool:
    """Whether tensor-parallel degree ``tp`` divides both the attention heads and the key/value
    heads (Megatron splits heads across tensor ranks; Shoeybi et al. 2019, section 3).

    Example:
        >>> tp_splits_heads(2, 4, 2), tp_splits_heads(4, 4, 2)
        (True, False)
    """
    return n_heads % tp == 0 and n_kv_heads % tp == 0


def padded_vocab_size(vocab_size: int, tp: int) -> int:
    """Rows of the vocabulary-parallel embedding: ``vocab_size`` rounded up to a multiple of
    ``tp`` (Megatron-LM's ``--make-vocab-size-divisible-by``, ``_vocab_size_with_padding``), so
    every tensor rank owns ``padded / tp`` rows. The padded rows are zero, their logits are
    masked out of the softmax (``workers.parallel.tensor_parallel.VocabParallelEmbedding``) and
    checkpoints hold the real ``vocab_size`` rows only, so padding changes no loss and no
    checkpoint.

    Example:
        >>> padded_vocab_size(257, 2), padded_vocab_size(256, 4), padded_vocab_size(5, 4)
        (258, 256, 8)
    """
    return -(-vocab_size // tp) * tp


def resume_problem(saved: Layout | None, planned: Layout) -> str | None:
    """Why a checkpoint written under ``saved`` cannot load under ``planned`` (``None`` if it can).

    The one ZeRO-3 resume rule: consolidated checkpoints (ZeRO 0-2) load under any layout;
    when either side uses ZeRO-3, the layouts must be equal.

    Example:
        >>> resume_problem(Layout(dp=2, zero_stage=2), Layout(dp=4, zero_stage=2)) is None
        True
        >>> resume_problem(Layout(dp=2, zero_stage=3), Layout(dp=4, zero_stage=3))[:21]
        'ZeRO-3 checkpoints lo'
    """
    if saved is None or saved == planned:
        return None
    if saved.layout_free_checkpoints and planned.layout_free_checkpoints:
        return None
    return (
        "ZeRO-3 checkpoints load under the same layout only: resume with the same workers and "
        "parallel settings, use parallel.zero_stage<=2, or start a new run name"
    )


class LayoutError(ValueError):
    """A layout is inconsistent with itself, the world size, the model or the batch."""


@dataclass(frozen=True)
class Layout:
    """A hybrid-parallel training layout.

    Attributes:
        dp: Data-parallel degree (model replicas).
        tp: Tensor-parallel degree (Megatron-style split of heads and MLP width).
        pp: Pipeline-parallel degree (stages).
        zero_stage: DeepSpeed ZeRO stage 0-3 over the data-parallel group.
        micro_batch: Sequences per micro-batch per data-parallel rank.
        grad_accum: Micro-batches accumulated per optimizer step (gradient accumulation steps).
        recompute: Activation recomputation: none, selective (attention only) or full (per block).
        sequence_parallel: Megatron sequence parallelism (requires tp > 1).
        virtual_stages: Interleaved virtual pipeline stages per rank.

    Raises:
        LayoutError: on creation, if a degree is < 1, ZeRO-2/3 is combined with pp > 1
            (DeepSpeed's pipeline engine supports ZeRO 0-1 only), sequence parallelism is asked
            without tensor parallelism, or virtual stages are asked without pipelines.

    Example:
        >>> Layout(dp=2, tp=2, pp=1, micro_batch=4, grad_accum=2).global_batch
        16
    """

    dp: int = 1
    tp: int = 1
    pp: int = 1
    zero_stage: int = 0
    micro_batch: int = 1
    grad_accum: int = 1
    recompute: Recompute = "none"
    sequence_parallel: bool = False
    virtual_stages: int = 1

    def __post_init__(self) -> None:
        for name in ("dp", "tp", "pp", "micro_batch", "grad_accum", "virtual_stages"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise LayoutError(f"{name}={value!r} must be a positive integer")
        if self.zero_stage not in (0, 1, 2, 3):
            raise LayoutError(f"zero_stage={self.zero_stage} must be 0, 1, 2 or 3")
        if self.pp > 1 and self.zero_stage > 1:
            raise LayoutError(
                f"zero_stage={self.zero_stage} with pp={self.pp}: DeepSpeed's pipeline "
                "engine supports ZeRO stage 0 or 1 only; use zero_stage<=1 or pp=1"
            )
        if self.recompute not in RECOMPUTE_CHOICES:
            raise LayoutError(
                f"recompute={self.recompute!r} must be one of {', '.join(RECOMPUTE_CHOICES)}"
            )
        if self.sequence_parallel and self.tp == 1:
            raise LayoutError("sequence_parallel=True needs tp > 1")
        if self.virtual_stages > 1 and self.pp == 1:
            raise LayoutError(f"virtual_stages={self.virtual_stages} needs pp > 1")

    @property
    def world_size(self) -> int:
        """Processes (GPUs) the layout occupies: ``dp * tp * pp``."""
        return self.dp * self.tp * self.pp

    @property
    def global_batch(self) -> int:
        """Sequences per optimizer step: ``dp * micro_batch * grad_accum``."""
        return self.dp * self.micro_batch * self.grad_accum

    def check_world_size(self, world_size: int) -> None:
        """Raise :class:`LayoutError` unless ``dp * tp * pp == world_size``."""
        if self.world_size != world_size:
            raise LayoutError(
                f"dp({self.dp}) * tp({self.tp}) * pp({self.pp}) = {self.world_size} "
                f"!= world_size({world_size})"
            )

    def check_model(self, n_heads: int, n_kv_heads: int, n_layers: int) -> None:
        """Raise :class:`LayoutError` if the model cannot be split this way.

        tp must divide the number of attention heads and key/value heads; pp may not exceed
        the number of layers (stages get ``n_layers // pp`` layers, the first ones one more
        when it does not divide).
        """
        if not tp_splits_heads(self.tp, n_heads, n_kv_heads):
            raise LayoutError(
                f"tp({self.tp}) must divide n_heads({n_heads}) and n_kv_heads({n_kv_heads})"
            )
        if self.pp * self.virtual_stages > n_layers:
            raise LayoutError(
                f"pp({self.pp}) * virtual_stages({self.virtual_stages}) > n_layers({n_layers}): "
                "every pipeline stage needs at least one layer"
            )

    @property
    def layout_free_checkpoints(self) -> bool:
        """Whether this layout's checkpoints load under any other layout (ZeRO 0-2: the
        consolidated format) or only under itself (ZeRO-3: DeepSpeed's own format)."""
        return self.zero_stage in LAYOUT_FREE_ZERO_STAGES

    def replace(self, **changes: Any) -> Layout:
        """Return a copy with ``changes`` applied (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """Plain-dict form (for JSON and logs)."""
        return dataclasses.asdict(self)

    def describe(self) -> str:
        """One-line summary, e.g. ``dp=2 tp=1 pp=1 zero=2 mb=8 ga=2``."""
        text = (
            f"dp={self.dp} tp={self.tp} pp={self.pp} zero={self.zero_stage} "
            f"mb={self.micro_batch} ga={self.grad_accum}"
        )
        if self.recompute != "none":
            text += f" recompute={self.recompute}"
        return text

    # ----------------------------------------------------------------- rank arithmetic
    def coords(self, rank: int) -> tuple[int, int, int]:
        """``(pp_rank, dp_rank, tp_rank)`` of a global rank (tensor rank fastest)."""
        if not 0 <= rank < self.world_size:
            raise LayoutError(f"rank {rank} outside world_size {self.world_size}")
        return rank // (self.dp * self.tp), (rank // self.tp) % self.dp, rank % self.tp

    def rank_of(self, pp_rank: int, dp_rank: int, tp_rank: int) -> int:
        """Global rank of the given coordinates (inverse of :meth:`coords`)."""
        return pp_rank * self.dp * self.tp + dp_rank * self.tp + tp_rank

    def tp_groups(self) -> list[list[int]]:
        """Tensor-parallel groups: ranks that hold shards of the same layers."""
        return [
            [self.rank_of(p, d, t) for t in range(self.tp)]
            for p in range(self.pp)
            for d in range(self.dp)
        ]

    def dp_groups(self) -> list[list[int]]:
        """Data-parallel groups: ranks that hold the same shard and average gradients."""
        return [
            [self.rank_of(p, d, t) for d in range(self.dp)]
            for p in range(self.pp)
            for t in range(self.tp)
        ]

    def pp_groups(self) -> list[list[int]]:
        """Pipeline groups: ranks that hold consecutive stages of one replica shard."""
        return [
            [self.rank_of(p, d, t) for p in range(self.pp)]
            for d in range(self.dp)
            for t in range(self.tp)
        ]


def unsupported_reason(layout: Layout) -> str | None:
    """Why the workers cannot run ``layout``, or ``None`` when they can.

    The workers run any ``(dp, tp, pp)`` with ZeRO 0-3 (0-1 with pipelines, enforced by
    :class:`Layout` itself) and activation recomputation; they do not implement Megatron
    sequence parallelism or interleaved virtual pipeline stages (DeepSpeed's ``PipelineEngine``
    has no interleaved schedule).

    Example:
        >>> unsupported_reason(Layout(dp=2, tp=2, sequence_parallel=True))
        'sequence_parallel=True is not implemented by the DeepSpeed workers; set parallel.sequence_parallel=false'
    """
    if layout.sequence_parallel:
        return (
            "sequence_parallel=True is not implemented by the DeepSpeed workers; "
            "set parallel.sequence_parallel=false"
        )
    if layout.virtual_stages > 1:
        return (
            f"virtual_stages={layout.virtual_stages}: DeepSpeed's PipelineEngine has no interleaved "
            "schedule; set parallel.virtual_stages=1"
        )
    return None
