"""Incremental decoding of an :class:`mla.model.MLATransformer`: prefill once, then token by token.

:func:`prefill` runs the model's own training forward pass over a right-padded prompt batch (so
its logits *are* the full-forward logits) and fills one cache per layer (:mod:`mla.kv_cache`)
from the same rotated queries, keys and values. :func:`decode_step` then feeds one new token per
row: each layer projects it, rotates it by the row's own position, lets its cache attend, and
applies the output projection and the MLP exactly as the training forward does. Right padding is
safe because every attention path is causal (a position never reads a later one), so rows of
different lengths share one prefill pass and one decode step.

Example:
    >>> state, logits = prefill(model, tokens, lengths=[5, 3])  # doctest: +SKIP
    >>> nxt = logits_at_last(logits, state)  # (2, vocab)         # doctest: +SKIP
    >>> logits = decode_step(model, nxt.argmax(-1), state)       # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import cast

import torch

from mla.attention import MultiLevelAttention
from mla.kv_cache import DenseKVCache, LayerCache, MLACache, StepPositions
from mla.model import MLATransformer, TransformerBlock
from mla.rope import apply_rope_at


@dataclass
class DecodeState:
    """Caches and per-row lengths of a batch being decoded.

    Attributes:
        caches: One :class:`~mla.kv_cache.LayerCache` per transformer block.
        lengths: Tokens held by each row (the next token's position), on the host.
        capacity: Most tokens a row may hold (``<= max_seq_len``).
    """

    caches: list[LayerCache]
    lengths: list[int]
    capacity: int
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def nbytes(self) -> int:
        """Bytes held by all caches."""
        return sum(c.nbytes() for c in self.caches)


def build_caches(
    model: MLATransformer,
    batch: int,
    capacity: int,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> list[LayerCache]:
    """One empty cache per layer, of the kind the model's attention needs.

    Args:
        model: The model.
        batch: Rows.
        capacity: Most positions per row (prompt + new tokens), ``<= cfg.max_seq_len``.
        device, dtype: Default: those of the model's parameters.

    Raises:
        ValueError: ``capacity`` outside ``[1, cfg.max_seq_len]``.
    """
    cfg = model.cfg
    if not 1 <= capacity <= cfg.max_seq_len:
        raise ValueError(
            f"cache capacity {capacity} must be within [1, max_seq_len={cfg.max_seq_len}]"
        )
    p = model.tok_emb.weight
    device, dtype = device or p.device, dtype or p.dtype
    shape = (batch, cfg.n_heads, cfg.kv_heads, cfg.head_dim, capacity)
    if cfg.attention == "dense":
        return [DenseKVCache(*shape, device=device, dtype=dtype) for _ in model.blocks]
    return [
        MLACache(
            *shape,
            window=cfg.local_window,
            top_k=cfg.global_k,
            block=cfg.block_size,
            indexer=cfg.indexer,
            device=device,
            dtype=dtype,
        )
        for _ in model.blocks
    ]


@torch.no_grad()
def prefill(
    model: MLATransformer,
    tokens: torch.Tensor,
    lengths: list[int] | None = None,
    capacity: int | None = None,
) -> tuple[DecodeState, torch.Tensor]:
    """Run the prompt batch through the model in one pass and fill the caches.

    Args:
        model: The model (put in eval mode: dropout would make decoding random).
        tokens: ``(batch, L)`` int64 prompt ids, right-padded (any id) past each row's length.
        lengths: Real length of each row (default: ``L`` for all), each ``>= 1``.
        capacity: Most tokens per row after decoding (default ``cfg.max_seq_len``).

    Returns:
        ``(state, logits)``: the decode state and the full-forward logits ``(batch, L, vocab)``
        (row ``b``'s next-token logits are at ``lengths[b] - 1``, see :func:`logits_at_last`).

    Raises:
        ValueError: an empty row, a length above ``L``, or ``L`` above the capacity.
    """
    b, n = tokens.shape
    lengths = [n] * b if lengths is None else [int(x) for x in lengths]
    capacity = model.cfg.max_seq_len if capacity is None else capacity
    if len(lengths) != b or min(lengths) < 1 or max(lengths) > n:
        raise ValueError(f"lengths {lengths} must give 1..{n} tokens for each of the {b} rows")
    if n > capacity:
        raise ValueError(
            f"prompt of {n} tokens exceeds the cache capacity {capacity} "
            f"(max_seq_len={model.cfg.max_seq_len})"
        )
    caches = build_caches(model, b, capacity, tokens.device)
    x = model.tok_emb(tokens)
    for block, cache in zip(blocks_of(model), caches, strict=False):
        xn = block.attn_norm(x)
        q, k, v = block.attn._project(xn)
        cache.prefill(q, k, v, tuple(lengths))
        h = x + block.attn(xn)
        x = h + block.mlp_dropout(block.mlp(block.mlp_norm(h)))
    logits = model.head(model.norm(x))
    return DecodeState(caches, list(lengths), capacity, tokens.device), logits


def logits_at_last(logits: torch.Tensor, state: DecodeState) -> torch.Tensor:
    """Next-token logits ``(batch, vocab)`` of each row from prefill logits ``(batch, L, vocab)``."""
    idx = torch.tensor([n - 1 for n in state.lengths], device=logits.device)
    return logits[torch.arange(logits.shape[0], device=logits.device), idx]


@torch.no_grad()
def decode_step(
    model: MLATransformer,
    tokens: torch.Tensor,
    state: DecodeState,
    active: list[bool] | None = None,
) -> torch.Tensor:
    """Feed one token per row and return the next-token logits.

    Args:
        model: The model that filled ``state``.
        tokens: ``(batch,)`` int64 ids, placed at positions ``state.lengths``.
        state: Advanced in place (each active row's length grows by one).
        active: Rows that go on (default all). An inactive row (one that has finished) is fed
            at its current position again without advancing, so it never outgrows the cache;
            its cache and logits are meaningless from then on.

    Returns:
        ``(batch, vocab)`` logits predicting the token after ``tokens``.

    Raises:
        ValueError: an active row would exceed ``state.capacity``.
    """
    active = [True] * len(state.lengths) if active is None else list(active)
    full = [n for n, a in zip(state.lengths, active, strict=False) if a and n >= state.capacity]
    if full:
        raise ValueError(
            f"a row already holds {full[0]} tokens, the cache capacity {state.capacity} "
            f"(max_seq_len={model.cfg.max_seq_len}); generate fewer tokens"
        )
    at = StepPositions.of(
        [
            n if a else min(n, state.capacity - 1)
            for n, a in zip(state.lengths, active, strict=False)
        ],
        tokens.device,
    )
    x = model.tok_emb(tokens.view(-1, 1))  # (b, 1, d)
    for block, cache in zip(blocks_of(model), state.caches, strict=False):
        h = x + _attention_step(block.attn, block.attn_norm(x), cache, at)
        x = h + block.mlp_dropout(block.mlp(block.mlp_norm(h)))
    state.lengths = [n + 1 if a else n for n, a in zip(state.lengths, active, strict=False)]
    return model.head(model.norm(x))[:, 0]


def blocks_of(model: MLATransformer) -> list[TransformerBlock]:
    """The model's transformer blocks, typed (``nn.ModuleList`` items are plain modules)."""
    return [cast(TransformerBlock, b) for b in model.blocks]


def _attention_step(
    attn: MultiLevelAttention, x: torch.Tensor, cache: LayerCache, at: StepPositions
) -> torch.Tensor:
    """One token through :class:`mla.attention.MultiLevelAttention`: ``(b, 1, d)`` -> ``(b, 1, d)``."""
    b = x.shape[0]
    hd = attn.cfg.head_dim
    q = attn.wq(x).view(b, 1, -1, hd).transpose(1, 2)
    k = attn.wk(x).view(b, 1, -1, hd).transpose(1, 2)
    v = attn.wv(x).view(b, 1, -1, hd).transpose(1, 2)
    cos, sin = cast(torch.Tensor, attn.rope_cos), cast(torch.Tensor, attn.rope_sin)
    q = apply_rope_at(q, cos, sin, at.pos)
    k = apply_rope_at(k, cos, sin, at.pos)
    o = cache.attend(q, k, v, attn._gate(x), at)  # (b, H, 1, hd)
    return attn.dropout(attn.wo(o.transpose(1, 2).reshape(b, 1, -1)))
