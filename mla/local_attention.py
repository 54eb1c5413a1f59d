"""Local branch: causal sliding-window attention (Longformer, Beltagy et al. 2020, Sec. 3.1).

Query i attends to keys ``i - w < j <= i`` (w = window). Two implementations with the same
result:

* :func:`blocked_local_attention` (any device): the sequence is cut into blocks of P tokens;
  each query block attends to its own key block and the ``ceil((w-1)/P)`` previous ones, masked
  to the exact window. Time and memory are O(n * w) (never n x n), forward and backward.
* FlexAttention (``torch.nn.attention.flex_attention``, compiled) with a sliding-window block
  mask, used on CUDA when available (:func:`local_backend`).
"""

from __future__ import annotations

import functools
import math
import os

import torch

from mla.tensor_ops import (
    block_chunks,
    check_qkv,
    eager_cache,
    num_blocks,
    pad_seq,
    repeat_kv,
)

#: Set this environment variable to ``1`` to force the blocked path on CUDA too.
DISABLE_FLEX_ENV = "MLA_DISABLE_FLEX"


def local_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int, block: int | None = None
) -> torch.Tensor:
    """Causal sliding-window attention, dispatched to FlexAttention or the blocked path.

    Args:
        q: Queries ``(batch, heads, seq, head_dim)``.
        k: Keys ``(batch, kv_heads, seq, head_dim)``; ``kv_heads`` divides ``heads`` (GQA).
        v: Values, shaped like ``k``.
        window: Window size w >= 1, in tokens; ``w >= seq`` is plain causal attention.
        block: Block size P of the blocked path, in tokens (default: ``window``).

    Returns:
        ``(batch, heads, seq, head_dim)``: ``softmax(q k^T / sqrt(d) + band mask) v``.

    Raises:
        ValueError: shapes disagree or ``window``/``block`` < 1.
    """
    check_qkv(q, k, v)
    k, v = repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1])
    if local_backend(q) == "flex":
        return _flex_local_attention(q, k, v, window)
    return blocked_local_attention(q, k, v, window, block)


def local_backend(q: torch.Tensor) -> str:
    """Return ``"flex"`` (CUDA, FlexAttention importable, fp16/bf16/fp32, not disabled by
    ``MLA_DISABLE_FLEX=1``) or ``"blocked"`` (everything else, e.g. CPU or fp64)."""
    if not q.is_cuda or os.environ.get(DISABLE_FLEX_ENV) == "1":
        return "blocked"
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return "blocked"
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
    except ImportError:
        return "blocked"
    return "flex"


def blocked_local_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int, block: int | None = None
) -> torch.Tensor:
    """Blocked causal sliding-window attention, O(n * w) time and memory.

    Query blocks are processed in chunks (:func:`mla.tensor_ops.block_chunks`) so that no score
    tensor exceeds ``CHUNK_ELEMENTS``.

    Args:
        q, k, v: ``(batch, heads, seq, head_dim)`` (kv heads already repeated).
        window: Window w >= 1, in tokens.
        block: Block size P >= 1, in tokens (default ``window``; clipped to ``seq``).

    Returns:
        ``(batch, heads, seq, head_dim)``.

    Raises:
        ValueError: ``window`` or ``block`` < 1.
    """
    n = q.shape[-2]
    w = _positive("window", window)
    p = min(_positive("block", block if block is not None else w), n)
    w = min(w, n)
    n_prev = num_blocks(w - 1, p)  # previous key blocks each query block needs
    nb = num_blocks(n, p)
    pad = nb * p - n
    b, h, _, d = q.shape
    qb = pad_seq(q * (1.0 / math.sqrt(d)), 0, pad).reshape(b, h, nb, p, d)
    kb = pad_seq(k, n_prev * p, pad).reshape(b, h, nb + n_prev, p, d)
    vb = pad_seq(v, n_prev * p, pad).reshape(b, h, nb + n_prev, p, d)
    bias = band_bias(nb, p, n_prev, w, q.device, q.dtype)
    outs = []
    for c0, c1 in block_chunks(nb, b * h * p * (n_prev + 1) * p):
        kw, vw = _key_windows(kb, n_prev, c0, c1), _key_windows(vb, n_prev, c0, c1)
        scores = (qb[:, :, c0:c1] @ kw.transpose(-1, -2)).add_(bias[c0:c1])
        outs.append(scores.softmax(dim=-1) @ vw)
    return torch.cat(outs, dim=2).reshape(b, h, nb * p, d)[..., :n, :]


def _key_windows(xb: torch.Tensor, n_prev: int, c0: int, c1: int) -> torch.Tensor:
    """Keys (or values) seen by query blocks ``c0..c1-1``: ``(batch, heads, c1 - c0, (n_prev+1)*p,
    d)`` from ``xb`` ``(batch, heads, nb + n_prev, p, d)`` (front-padded by ``n_prev`` blocks)."""
    return torch.cat([xb[:, :, c0 + j : c1 + j] for j in range(n_prev + 1)], dim=3)


@eager_cache(maxsize=64)
def _band_mask_cached(nb: int, p: int, n_prev: int, w: int, device: str) -> torch.Tensor:
    qpos = torch.arange(nb, device=device).view(nb, 1, 1) * p + torch.arange(p, device=device).view(
        1, p, 1
    )
    kpos = (torch.arange(nb, device=device).view(nb, 1, 1) - n_prev) * p + torch.arange(
        (n_prev + 1) * p, device=device
    ).view(1, 1, -1)
    delta = qpos - kpos
    return (delta >= 0) & (delta < w) & (kpos >= 0)


def band_mask(nb: int, p: int, n_prev: int, w: int, device: torch.device) -> torch.Tensor:
    """Boolean keep-mask ``(nb, p, (n_prev+1)*p)`` of the blocked sliding window.

    Query ``a`` of block ``i`` sits at ``i*p + a``; key ``c`` of its window at ``(i - n_prev)*p
    + c``; it is kept iff ``0 <= qpos - kpos < w`` and ``kpos >= 0`` (Longformer's band).
    """
    return _band_mask_cached(nb, p, n_prev, w, str(device))


@eager_cache(maxsize=64)
def _band_bias_cached(
    nb: int, p: int, n_prev: int, w: int, device: str, dtype: torch.dtype
) -> torch.Tensor:
    keep = _band_mask_cached(nb, p, n_prev, w, device)
    return torch.zeros(keep.shape, dtype=dtype, device=device).masked_fill_(~keep, float("-inf"))


def band_bias(
    nb: int, p: int, n_prev: int, w: int, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """Additive form of :func:`band_mask`: 0 where kept, ``-inf`` elsewhere, in ``dtype``."""
    return _band_bias_cached(nb, p, n_prev, w, str(device), dtype)


def _positive(name: str, value: int) -> int:
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} must be a positive integer number of tokens")
    return value


_COMPILED_FLEX = None


@functools.lru_cache(maxsize=32)
def _flex_block_mask(n: int, window: int, device: str):
    from torch.nn.attention.flex_attention import create_block_mask

    def sliding_window(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (q_idx - kv_idx < window)

    return create_block_mask(sliding_window, None, None, n, n, device=device)


def _flex_local_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int
) -> torch.Tensor:
    """FlexAttention with a sliding-window block mask (CUDA only; compiled once per process)."""
    global _COMPILED_FLEX
    from torch.nn.attention.flex_attention import flex_attention

    if _COMPILED_FLEX is None:
        _COMPILED_FLEX = torch.compile(flex_attention, dynamic=False)
    mask = _flex_block_mask(q.shape[-2], _positive("window", window), str(q.device))
    with _recompile_limit(64):
        return _COMPILED_FLEX(q, k, v, block_mask=mask, scale=1.0 / math.sqrt(q.shape[-1]))


def _recompile_limit(limit: int):
    """Let dynamo compile flex attention for up to ``limit`` shapes (default 8): past the limit
    it would silently run flex attention eagerly, which materialises the n x n score matrix."""
    import torch._dynamo

    cfg = torch._dynamo.config
    name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
    return cfg.patch(**{name: max(limit, getattr(cfg, name))})
