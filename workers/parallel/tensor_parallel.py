"""Megatron-style tensor parallelism for the MLA transformer (Shoeybi et al. 2019, Sec. 3).

Within a tensor-parallel group of ``tp`` ranks:

* attention (:class:`ParallelAttention`): ``wq``, ``wk``, ``wv`` and the gate ``w_gate`` are
  column-parallel (each rank owns ``n_heads / tp`` query heads, ``kv_heads / tp`` key/value
  heads and the gate rows of its heads), so both branches (local window and global top-k) and
  the gate run on local heads only through the unchanged functional core of :mod:`mla.attention`;
  ``wo`` is row-parallel (one all-reduce in the forward pass);
* SwiGLU MLP (:class:`ParallelSwiGLU`): ``w1`` and ``w3`` column-parallel, ``w2`` row-parallel;
* embedding (:class:`VocabParallelEmbedding`): each rank owns ``vocab / tp`` rows; the tied
  output head computes only its vocabulary shard of the logits and
  :func:`vocab_parallel_cross_entropy` computes the loss without gathering them (Megatron-LM
  ``_VocabParallelCrossEntropy``).

Norm weights stay replicated (identical gradients on every tensor rank). Split parameters carry
``tensor_model_parallel = True`` (DeepSpeed counts them on every tensor rank in the gradient
norm) and ``partition_dim``. Dropout masks are not synchronised across tensor ranks; the tiny
presets use ``dropout = 0``.

Communication per block and micro-batch (forward + backward): 2 all-reduces of the
``(batch, seq, d_model)`` activations each way, as in Megatron-LM.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from mla.attention import MultiLevelAttention
from mla.model import SwiGLU
from orchestrator.contract.layout import padded_vocab_size, tp_splits_heads

#: Split dimension of every tensor-parallel parameter, by the parameter's name suffix (names of
#: :class:`mla.model.MLATransformer`); parameters not listed are replicated.
SPLIT_DIMS: dict[str, int] = {
    "attn.wq.weight": 0,
    "attn.wk.weight": 0,
    "attn.wv.weight": 0,
    "attn.w_gate.weight": 0,
    "attn.w_gate.bias": 0,
    "attn.wo.weight": 1,
    "mlp.w1.weight": 0,
    "mlp.w3.weight": 0,
    "mlp.w2.weight": 1,
    "tok_emb.weight": 0,
}


def split_dim(name: str) -> int | None:
    """Dimension along which the parameter ``name`` is split across tensor ranks, or ``None``."""
    for suffix, dim in SPLIT_DIMS.items():
        if name == suffix or name.endswith("." + suffix):
            return dim
    return None


def shard(full: torch.Tensor, dim: int | None, tp_rank: int, tp: int) -> torch.Tensor:
    """Rank ``tp_rank``'s contiguous slice of ``full`` along ``dim`` (all of it if ``dim`` is None).

    Raises:
        ValueError: ``tp`` does not divide the size of ``dim``.
    """
    if dim is None or tp == 1:
        return full
    if full.shape[dim] % tp:
        raise ValueError(
            f"tensor of shape {tuple(full.shape)} cannot be split in {tp} along dim {dim}"
        )
    return full.chunk(tp, dim=dim)[tp_rank]


# ------------------------------------------------------------------ communication primitives
class _CopyToGroup(torch.autograd.Function):
    """Identity forward, all-reduce (sum) of the gradient backward (Megatron's ``f``)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _ReduceFromGroup(torch.autograd.Function):
    """All-reduce (sum) forward, identity backward (Megatron's ``g``)."""

    @staticmethod
    def forward(ctx, x, group):
        x = x.contiguous().clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _GatherFromGroup(torch.autograd.Function):
    """All-gather along the last dim forward, this rank's slice of the gradient backward
    (Megatron's ``gather_from_tensor_model_parallel_region``)."""

    @staticmethod
    def forward(ctx, x, group, size):
        ctx.rank, ctx.width = dist.get_rank(group), x.size(-1)
        parts = [torch.empty_like(x) for _ in range(size)]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=-1)

    @staticmethod
    def backward(ctx, grad):
        start = ctx.rank * ctx.width
        return grad[..., start : start + ctx.width].contiguous(), None, None


def gather_from_group(x: torch.Tensor, group, size: int) -> torch.Tensor:
    """The whole of a tensor split over ``group`` along its last dim (e.g. vocabulary-sharded
    logits ``(batch, seq, V / tp)`` -> ``(batch, seq, V)``); the gradient flows back to each
    rank's slice."""
    return x if size == 1 else _GatherFromGroup.apply(x, group, size)


def copy_to_group(x: torch.Tensor, group, size: int) -> torch.Tensor:
    """Enter a tensor-parallel region: identity forward, gradient summed over ``group``."""
    return x if size == 1 else _CopyToGroup.apply(x, group)


def reduce_from_group(x: torch.Tensor, group, size: int) -> torch.Tensor:
    """Leave a tensor-parallel region: partial results summed over ``group``."""
    return x if size == 1 else _ReduceFromGroup.apply(x, group)


# ------------------------------------------------------------------ layers
class _ShardedLinear(nn.Module):
    """A linear layer holding one tensor rank's shard of a full ``nn.Linear``."""

    def __init__(self, full: nn.Linear, dim: int, tp_rank: int, tp: int, group):
        super().__init__()
        self.tp, self.group = tp, group
        self.weight = nn.Parameter(shard(full.weight.detach(), dim, tp_rank, tp).clone())
        bias = (
            None
            if full.bias is None
            else shard(full.bias.detach(), 0 if dim == 0 else None, tp_rank, tp)
        )
        self.bias = None if bias is None else nn.Parameter(bias.clone())
        for p, split in ((self.weight, True), (self.bias, dim == 0)):
            if p is not None and split and tp > 1:
                p.tensor_model_parallel, p.partition_dim = True, dim


class ColumnParallelLinear(_ShardedLinear):
    """``y_r = x W_r^T + b_r`` with the output features split: weight ``(out / tp, in)``.

    The input must already be in the tensor-parallel region (:func:`copy_to_group`), so one
    gradient all-reduce serves all projections reading the same input.

    Args:
        full: The full layer (``weight (out, in)``), from which this rank's rows are copied.
        tp_rank, tp: This rank and the group size.
        group: The tensor-parallel process group.
    """

    def __init__(self, full: nn.Linear, tp_rank: int, tp: int, group):
        super().__init__(full, 0, tp_rank, tp, group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``(..., in)`` -> ``(..., out / tp)``."""
        return F.linear(x, self.weight, self.bias)


class RowParallelLinear(_ShardedLinear):
    """``y = sum_r x_r W_r^T`` with the input features split: weight ``(out, in / tp)``; the sum
    is one all-reduce. The layers here have no bias (a bias would be added once, after it)."""

    def __init__(self, full: nn.Linear, tp_rank: int, tp: int, group):
        if full.bias is not None:
            raise ValueError("RowParallelLinear supports bias=False layers only")
        super().__init__(full, 1, tp_rank, tp, group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``(..., in / tp)`` -> ``(..., out)`` (summed over the group)."""
        return reduce_from_group(F.linear(x, self.weight), self.group, self.tp)


class VocabParallelEmbedding(nn.Module):
    """Embedding whose vocabulary rows are split: rank r owns ids ``[r Vp/tp, (r+1) Vp/tp)``.

    ``Vp`` is the vocabulary padded to a multiple of ``tp``
    (:func:`orchestrator.contract.layout.padded_vocab_size`, Megatron-LM's
    ``--make-vocab-size-divisible-by``): the padded rows are zeros that no token looks up, and
    the tied head masks their logits to ``-inf``, so the softmax, the loss and every gradient of
    the real rows are those of the unpadded model (the padded rows get zero gradient).
    Ids outside the shard look up zeros; the all-reduce adds the one rank that owns each id.

    Args:
        full: The full ``nn.Embedding`` ``(vocab, d_model)``.
        tp_rank, tp, group: This rank, the group size and the tensor-parallel group.
    """

    def __init__(self, full: nn.Embedding, tp_rank: int, tp: int, group):
        super().__init__()
        self.tp, self.group = tp, group
        self.vocab_size = full.num_embeddings
        self.per_rank = padded_vocab_size(self.vocab_size, tp) // tp
        self.vocab_start = tp_rank * self.per_rank
        rows = pad_rows(full.weight.detach(), self.per_rank * tp)
        self.weight = nn.Parameter(shard(rows, 0, tp_rank, tp).clone())
        #: Logit columns at the end of this shard that are padding (ids >= vocab_size).
        self.padded_cols = min(
            self.per_rank, max(0, self.vocab_start + self.per_rank - self.vocab_size)
        )
        if tp > 1:
            self.weight.tensor_model_parallel, self.weight.partition_dim = True, 0

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """``tokens``: ``(batch, seq)`` int64 -> ``(batch, seq, d_model)``."""
        if self.tp == 1:
            return F.embedding(tokens, self.weight)
        local = tokens - self.vocab_start
        outside = (local < 0) | (local >= self.per_rank)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        return reduce_from_group(out.masked_fill(outside.unsqueeze(-1), 0.0), self.group, self.tp)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Tied head (Press & Wolf 2017): ``(batch, seq, d_model)`` -> this rank's vocabulary
        shard of the logits, ``(batch, seq, Vp / tp)``; padded ids' logits are ``-inf``."""
        logits = F.linear(copy_to_group(x, self.group, self.tp), self.weight)
        if not self.padded_cols:
            return logits
        pad = torch.zeros(logits.size(-1), dtype=torch.bool, device=logits.device)
        pad[-self.padded_cols :] = True
        return logits.masked_fill(pad, float("-inf"))


def pad_rows(full: torch.Tensor, rows: int) -> torch.Tensor:
    """``full`` ``(n, ...)`` with zero rows appended up to ``rows`` (itself if ``rows <= n``)."""
    if rows <= full.size(0):
        return full
    return torch.cat([full, full.new_zeros(rows - full.size(0), *full.shape[1:])])


def vocab_parallel_cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, vocab_start: int, group, tp: int
) -> torch.Tensor:
    """Mean token cross-entropy from vocabulary-sharded logits, without gathering them.

    ``loss_i = log sum_v exp(z_iv - m_i) - (z_i,t_i - m_i)`` with the sums and the max over the
    whole vocabulary taken by all-reduces over the tensor group (Megatron-LM,
    ``_VocabParallelCrossEntropy``). Every tensor rank returns the same value.

    Args:
        logits: ``(batch, seq, Vp / tp)`` this rank's shard of the padded vocabulary (any float
            dtype; computed in fp32); padded ids' logits are ``-inf`` and add nothing.
        targets: ``(batch, seq)`` int64 ids in ``[0, vocab)``.
        vocab_start: First id of this rank's shard.
        group, tp: The tensor-parallel group and its size.

    Returns:
        Scalar: the mean over all ``batch * seq`` tokens.
    """
    z = logits.float().reshape(-1, logits.size(-1))
    t = targets.reshape(-1)
    if tp == 1:
        return F.cross_entropy(z, t)
    with torch.no_grad():
        m = z.max(dim=-1).values
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    z = z - m.unsqueeze(-1)
    sum_exp = reduce_from_group(z.exp().sum(-1), group, tp)
    local = t - vocab_start
    mine = (local >= 0) & (local < z.size(-1))
    picked = z.gather(1, local.clamp(0, z.size(-1) - 1).unsqueeze(1)).squeeze(1)
    picked = picked.masked_fill(~mine, 0.0)  # not `* mine`: a padded logit is -inf
    picked = reduce_from_group(picked, group, tp)
    return (sum_exp.log() - picked).mean()


class ParallelAttention(MultiLevelAttention):
    """:class:`mla.attention.MultiLevelAttention` on this rank's heads (``n_heads / tp``).

    ``forward`` is the parent's (projections, rotary embedding, the functional MLA core,
    output projection); only the projections are sharded and the input enters the
    tensor-parallel region once.
    """

    def __init__(self, full: MultiLevelAttention, tp_rank: int, tp: int, group):
        nn.Module.__init__(self)  # the parent's __init__ would allocate full-size weights
        self.cfg, self.layer_idx, self.tp, self.group = full.cfg, full.layer_idx, tp, group
        self.wq = ColumnParallelLinear(full.wq, tp_rank, tp, group)
        self.wk = ColumnParallelLinear(full.wk, tp_rank, tp, group)
        self.wv = ColumnParallelLinear(full.wv, tp_rank, tp, group)
        self.wo = RowParallelLinear(full.wo, tp_rank, tp, group)
        self.w_gate = (
            None if full.w_gate is None else ColumnParallelLinear(full.w_gate, tp_rank, tp, group)
        )
        self.dropout = full.dropout
        self.register_buffer("rope_cos", full.rope_cos, persistent=False)
        self.register_buffer("rope_sin", full.rope_sin, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``(batch, seq, d_model)`` (replicated) -> same shape (replicated)."""
        return super().forward(copy_to_group(x, self.group, self.tp))


class ParallelSwiGLU(SwiGLU):
    """:class:`mla.model.SwiGLU` with ``w1``, ``w3`` column- and ``w2`` row-parallel."""

    def __init__(self, full: SwiGLU, tp_rank: int, tp: int, group):
        nn.Module.__init__(self)
        self.tp, self.group = tp, group
        self.w1 = ColumnParallelLinear(full.w1, tp_rank, tp, group)
        self.w3 = ColumnParallelLinear(full.w3, tp_rank, tp, group)
        self.w2 = RowParallelLinear(full.w2, tp_rank, tp, group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``(..., d_model)`` -> same shape: ``w2(silu(w1 x) * w3 x)`` (Shazeer 2020, eq. 6)."""
        x = copy_to_group(x, self.group, self.tp)
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def apply_tensor_parallel(module: nn.Module, tp_rank: int, tp: int, group) -> nn.Module:
    """Replace, in place, every attention, SwiGLU and token embedding inside ``module`` by its
    tensor-parallel shard for rank ``tp_rank`` of ``tp`` (weights copied from the full layers).

    Parameter names do not change (``attn.wq.weight`` stays ``attn.wq.weight``, now holding
    ``n_heads / tp`` heads), so :func:`split_dim` maps them back to full tensors.

    Args:
        module: A :class:`mla.model.TransformerBlock`, an embedding holder or a whole model.
        tp_rank, tp, group: This rank, the group size and the tensor-parallel group.

    Returns:
        ``module`` (or its replacement when ``module`` itself is one of the replaced types).

    Raises:
        ValueError: ``tp`` does not divide the heads, key/value heads, MLP width or vocabulary.
    """

    def convert(child: nn.Module) -> nn.Module | None:
        if isinstance(child, MultiLevelAttention) and not isinstance(child, ParallelAttention):
            cfg = child.cfg
            if not tp_splits_heads(tp, cfg.n_heads, cfg.kv_heads):
                raise ValueError(
                    f"tp({tp}) must divide n_heads({cfg.n_heads}) and kv_heads({cfg.kv_heads})"
                )
            return ParallelAttention(child, tp_rank, tp, group)
        if isinstance(child, SwiGLU) and not isinstance(child, ParallelSwiGLU):
            return ParallelSwiGLU(child, tp_rank, tp, group)
        if isinstance(child, nn.Embedding):
            return VocabParallelEmbedding(child, tp_rank, tp, group)
        return None

    replaced = convert(module)
    if replaced is not None:
        return replaced
    for name, child in list(module.named_children()):
        new = convert(child)
        if new is not None:
            setattr(module, name, new)
        else:
            apply_tensor_parallel(child, tp_rank, tp, group)
    return module
