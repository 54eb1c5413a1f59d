"""Small tensor helpers shared by the attention branches (GQA head repetition, block padding)."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


def repeat_kv(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Repeat key/value heads for grouped-query attention (Ainslie et al. 2023, GQA).

    Args:
        x: ``(batch, kv_heads, seq, head_dim)``.
        n_heads: Number of query heads; a multiple of ``kv_heads``.

    Returns:
        ``(batch, n_heads, seq, head_dim)``; query head ``h`` reads kv head ``h // (n_heads //
        kv_heads)``. ``x`` itself when ``kv_heads == n_heads``.

    Raises:
        ValueError: ``n_heads`` is not a multiple of ``kv_heads``.
    """
    kv_heads = x.shape[1]
    if n_heads == kv_heads:
        return x
    if n_heads % kv_heads:
        raise ValueError(
            f"query heads ({n_heads}) must be a multiple of key/value heads ({kv_heads})"
        )
    return x.repeat_interleave(n_heads // kv_heads, dim=1)


def pad_seq(x: torch.Tensor, before: int, after: int) -> torch.Tensor:
    """Zero-pad the sequence axis of ``x`` (``(..., seq, head_dim)``) by ``before``/``after`` rows."""
    if before == 0 and after == 0:
        return x
    return F.pad(x, (0, 0, before, after))


def num_blocks(seq: int, block: int) -> int:
    """Number of blocks of ``block`` tokens that cover ``seq`` tokens (last one may be partial)."""
    return -(-seq // block)


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Check that ``q, k, v`` are ``(batch, heads, seq, head_dim)`` with matching sizes.

    Raises:
        ValueError: a tensor is not 4-D, or batch/seq/head_dim differ, or k and v differ.
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"q, k, v must be (batch, heads, seq, head_dim); got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(
            f"q {tuple(q.shape)} and k/v {tuple(k.shape)}/{tuple(v.shape)} disagree "
            "on batch, seq or head_dim"
        )


#: Elements of the largest per-chunk score tensor (16 MiB in fp32). Larger tensors would be
#: served by fresh mmap()s on glibc (above its 32 MiB dynamic threshold) and page-faulted on
#: every call, which made the n=16k CPU path several times slower than n=8k.
CHUNK_ELEMENTS = 1 << 22


def block_chunks(
    n_blocks: int, elements_per_block: int, budget: int | None = None
) -> list[tuple[int, int]]:
    """Split ``range(n_blocks)`` into consecutive ``(start, stop)`` chunks of query blocks whose
    score tensors hold at most ``budget`` (default :data:`CHUNK_ELEMENTS`) elements each (at
    least one block per chunk).

    Example:
        >>> block_chunks(10, 3, budget=9)
        [(0, 3), (3, 6), (6, 9), (9, 10)]
    """
    budget = CHUNK_ELEMENTS if budget is None else budget
    per_chunk = max(1, budget // max(1, elements_per_block))
    return [(start, min(n_blocks, start + per_chunk)) for start in range(0, n_blocks, per_chunk)]


def eager_cache(maxsize: int):
    """``functools.lru_cache`` for mask builders, bypassed while torch traces (compile, export).

    A mask first built inside ``torch.export`` / ``torch.onnx.export(dynamo=True)`` is a
    tracing-time tensor (a ``FakeTensor`` there); cached, it was handed to later eager calls,
    which then computed wrong attention: a model exported before its first eager forward gave
    logits off by more than 1 afterwards. Under tracing the builder runs uncached, so the traced
    graph holds the mask as constants and the cache only ever holds eager tensors.
    ``torch.compiler.is_compiling()`` is true in both dynamo and non-strict export tracing.

    Args:
        maxsize: Entries kept, as for ``functools.lru_cache``.

    Returns:
        A decorator; the wrapped function keeps ``cache_info`` and ``cache_clear``.
    """

    def wrap(fn):
        cached = functools.lru_cache(maxsize=maxsize)(fn)

        @functools.wraps(fn)
        def call(*args):
            return fn(*args) if torch.compiler.is_compiling() else cached(*args)

        call.cache_info = cached.cache_info
        call.cache_clear = cached.cache_clear
        return call

    return wrap
