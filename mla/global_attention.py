"""Global branch: sparse causal attention over selected keys (block selection or exact top-k).

Each query attends, with a softmax of its own, only to a selected subset of its causal keys. The
choice is discrete: selected indices carry no gradient, the scores and values of the chosen keys
do.

``indexer="block"`` (the model's global branch; Native Sparse Attention's selection branch at
query-block level, Yuan et al. 2025, Sec. 3.3.2): query block I attends to all causal keys of its
own block plus the ``ceil(global_k / B)`` strictly earlier key blocks chosen by
:func:`mla.block_selection.select_blocks` (one choice per key/value head, shared by its GQA
group). The full rule, and what ``global_k`` means, is in :mod:`mla.block_selection`. This module
holds the portable blocked implementation (:func:`block_selection_attention`, any device,
autograd): per query block, the keys of its ``width + 1`` blocks are gathered and soft-maxed under
a static mask. Time and memory are O(n * (n_sel + 1) * B) plus the O((n/B)^2) block scores, never
n x n. The FlexAttention path for CUDA is :mod:`mla.flex_attention`.

``indexer="exact"`` (reference option, O(n^2) scoring): each query attends to the exact
token-level top-k of ``s_ij = q_i . k_j / sqrt(d)`` over ``j <= i`` (all of them when fewer than
k exist), scored in chunks of queries so memory is O(chunk * n + n * k).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from mla.block_selection import BlockSelection, select_blocks
from mla.tensor_ops import (
    block_chunks,
    check_qkv,
    eager_cache,
    num_blocks,
    pad_seq,
    repeat_kv,
)

#: Queries scored at once by the exact indexer (bounds its scoring memory to chunk x n).
EXACT_CHUNK = 1024


def global_topk_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    top_k: int,
    indexer: str = "block",
    block: int = 64,
) -> torch.Tensor:
    """Sparse causal global branch (see the module docstring for both indexers).

    Args:
        q: Queries ``(batch, heads, seq, head_dim)``.
        k: Keys ``(batch, kv_heads, seq, head_dim)``; ``kv_heads`` divides ``heads`` (GQA).
        v: Values, shaped like ``k``.
        top_k: ``global_k``: for ``"block"``, the earlier-key budget (``ceil(top_k / block)``
            blocks); for ``"exact"``, keys per query (``k >= seq`` keeps every causal key).
        indexer: ``"block"`` or ``"exact"``.
        block: Block size B of the block selection, in tokens.

    Returns:
        ``(batch, heads, seq, head_dim)``.

    Raises:
        ValueError: bad shapes, ``top_k`` or ``block`` < 1, or an unknown ``indexer``.
    """
    check_qkv(q, k, v)
    _positive("top_k", top_k)
    if indexer == "exact":
        k, v = repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1])
        return exact_topk_attention(q, k, v, top_k)
    if indexer == "block":
        _positive("block", block)
        if q.shape[1] % k.shape[1]:
            repeat_kv(k, q.shape[1])  # raises the GQA error
        return block_selection_attention(q, k, v, select_blocks(q, k, top_k, block), block)
    raise ValueError(f"indexer={indexer!r} must be 'exact' or 'block'")


# --------------------------------------------------------------------------- exact indexer


@torch.no_grad()
def exact_topk_indices(
    q: torch.Tensor, k: torch.Tensor, top_k: int, chunk: int = EXACT_CHUNK
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact causal top-k key indices per query, scored chunk by chunk (no gradient).

    Args:
        q, k: ``(batch, heads, seq, head_dim)``.
        top_k: k; clipped to ``seq``.
        chunk: Queries scored at once.

    Returns:
        ``(idx, valid)``, each ``(batch, heads, seq, min(top_k, seq))``: key indices and
        whether each is a real causal key (query i has only i + 1 of them).
    """
    n = q.shape[-2]
    kk = min(top_k, n)
    idx, valid = [], []
    for start in range(0, n, chunk):
        s = q[:, :, start : start + chunk] @ k.transpose(-1, -2)
        qpos = torch.arange(start, start + s.shape[-2], device=q.device).unsqueeze(-1)
        s = s.masked_fill(torch.arange(n, device=q.device) > qpos, float("-inf"))
        vals, ids = s.topk(kk, dim=-1)
        idx.append(ids)
        valid.append(torch.isfinite(vals))
    return torch.cat(idx, dim=-2), torch.cat(valid, dim=-2)


def exact_topk_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, top_k: int
) -> torch.Tensor:
    """Attention of each query over its exact causal top-k keys.

    Args:
        q, k, v: ``(batch, heads, seq, head_dim)`` (kv heads already repeated).
        top_k: k >= 1.

    Returns:
        ``(batch, heads, seq, head_dim)``: ``softmax_{j in topk(i)}(s_ij) v_j``.
    """
    idx, valid = exact_topk_indices(q, k, top_k)
    k_sel, v_sel = gather_rows(k, idx), gather_rows(v, idx)  # (b, h, n, kk, d)
    s = torch.einsum("bhnd,bhnkd->bhnk", q, k_sel) / math.sqrt(q.shape[-1])
    p = s.masked_fill(~valid, float("-inf")).softmax(dim=-1)
    return torch.einsum("bhnk,bhnkd->bhnd", p, v_sel)


def gather_rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Gather rows of ``x`` per (batch, head): ``out[b, h, i, j] = x[b, h, idx[b, h, i, j]]``.

    Args:
        x: ``(batch, heads, rows, d)``.
        idx: ``(batch, heads, n, m)`` integer row indices into ``x``.

    Returns:
        ``(batch, heads, n, m, d)``. Implemented as an embedding lookup into the flattened
        rows (the fastest row gather on CPU), whose backward accumulates into ``x``'s shape
        (memory O(n * m * d), not O(n * rows * d) as with ``gather`` on an expanded view).
    """
    b, h, rows, d = x.shape
    offset = torch.arange(b * h, device=x.device).view(b, h, 1, 1) * rows
    flat = (idx + offset).reshape(-1)
    return F.embedding(flat, x.reshape(b * h * rows, d)).view(*idx.shape, d)


# --------------------------------------------------------------------------- block selection


def block_selection_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, selection: BlockSelection, block: int
) -> torch.Tensor:
    """Attention of every query over the causal keys of its own block and its selected blocks.

    Query heads are grouped over their key/value head (no ``repeat_kv`` copy): for each chunk of
    query blocks (:func:`mla.tensor_ops.block_chunks`), the ``width + 1`` key blocks (diagonal
    first, then the selection, padding clamped to block 0 and masked) are gathered once per
    key/value head, scored by the group's ``G`` query heads, masked by a static additive bias
    (:func:`selection_bias`) and soft-maxed.

    Args:
        q: Queries ``(batch, heads, seq, head_dim)``.
        k, v: ``(batch, kv_heads, seq, head_dim)``; ``kv_heads`` divides ``heads``.
        selection: From :func:`mla.block_selection.select_blocks` (``indices``
            ``(batch, kv_heads, nb, width)``).
        block: Block size B of the selection, in tokens.

    Returns:
        ``(batch, heads, seq, head_dim)``.
    """
    b, h, n, d = q.shape
    hkv = k.shape[1]
    idx, _ = selection
    nb, width = idx.shape[2], idx.shape[3]
    diag = torch.arange(nb, device=q.device).view(1, 1, nb, 1).expand(b, hkv, nb, 1)
    blocks = torch.cat([diag, idx.clamp(min=0)], dim=-1)  # (b, hkv, nb, width + 1)
    qb = _query_blocks(q * (1.0 / math.sqrt(d)), block).view(b, hkv, h // hkv, nb, block, d)
    kb, vb = _query_blocks(k, block).flatten(-2), _query_blocks(v, block).flatten(-2)
    bias = selection_bias(nb, block, width, q.device, q.dtype)
    outs = []
    for c0, c1 in block_chunks(nb, b * h * block * (width + 1) * block):
        sel = blocks[:, :, c0:c1]
        kc = _candidate_blocks(kb, sel, d).unsqueeze(2)  # (b, hkv, 1, nc, C, d)
        vc = _candidate_blocks(vb, sel, d).unsqueeze(2)
        scores = (qb[:, :, :, c0:c1] @ kc.transpose(-1, -2)).add_(bias[c0:c1])
        outs.append(scores.softmax(dim=-1) @ vc)
    return torch.cat(outs, dim=3).reshape(b, h, nb * block, d)[..., :n, :]


@eager_cache(maxsize=64)
def _selection_bias_cached(
    nb: int, block: int, width: int, device: str, dtype: torch.dtype
) -> torch.Tensor:
    ar = torch.arange(block, device=device)
    diag = ar.view(1, -1) <= ar.view(-1, 1)  # (B, B) causal inside the diagonal block
    used = torch.arange(width, device=device).view(1, -1) < torch.arange(nb, device=device).view(
        -1, 1
    )
    keep = torch.cat(
        [
            diag.expand(nb, block, block),
            used.view(nb, 1, width, 1).expand(nb, block, width, block).reshape(nb, block, -1),
        ],
        -1,
    )
    return torch.zeros(keep.shape, dtype=dtype, device=device).masked_fill_(~keep, float("-inf"))


def selection_bias(
    nb: int, block: int, width: int, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """Additive mask ``(nb, B, (width + 1) * B)`` of :func:`block_selection_attention` (cached).

    Candidate column ``c < B`` is key ``c`` of the diagonal block (kept iff ``c <= a`` for query
    ``a`` of the block); column ``B + s*B + t`` is key ``t`` of selected block ``s``, kept iff
    ``s < min(n_sel, I)`` (every selection entry below the count is valid and earlier, so all its
    keys are causal). The mask depends on no data, only on ``(nb, B, width)``.
    """
    return _selection_bias_cached(nb, block, width, str(device), dtype)


def _query_blocks(q: torch.Tensor, block: int) -> torch.Tensor:
    """``(b, h, seq, d)`` -> zero-padded ``(b, h, nb, B, d)``."""
    nb = num_blocks(q.shape[-2], block)
    return pad_seq(q, 0, nb * block - q.shape[-2]).reshape(*q.shape[:2], nb, block, q.shape[-1])


def _candidate_blocks(xb: torch.Tensor, blocks: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Rows of the chosen blocks: ``xb`` ``(b, h, nb, B * d)``, ``blocks`` ``(b, h, nc, m + 1)``
    -> ``(b, h, nc, (m + 1) * B, d)``."""
    rows = gather_rows(xb, blocks)  # (b, h, nc, m + 1, B * d)
    return rows.reshape(*blocks.shape[:3], -1, head_dim)


def _positive(name: str, value: int) -> int:
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} must be a positive integer")
    return value
