"""Global branch: sparse causal top-k attention, with an exact or a block indexer.

Each query i attends only to ``top_k`` causal keys ``j <= i``, chosen by an *indexer*, with a
softmax over the chosen keys alone. The choice itself is discrete: selected indices carry no
gradient, the scores and values of the chosen keys do.

``indexer="exact"`` (the reference semantics): the chosen keys are the exact token-level top-k of
``s_ij = q_i . k_j / sqrt(d)`` over ``j <= i`` (all of them when fewer than k exist). Scoring is
O(n^2) in time but done in chunks of queries, so memory is O(chunk * n + n * k).

``indexer="block"`` (cheap, after Native Sparse Attention, Yuan et al. 2025, Sec. 3.3.2, "token
selection" from block importance scores): keys and queries are cut into blocks of B tokens
(query block I holds positions ``I*B .. I*B + B - 1``). Key block J is summarised by the mean of
its keys. Query block I is summarised by the mean of the B queries *ending at its first
position*, ``q[I*B - B + 1 .. I*B]`` (fewer at the start), so that the choice, which all queries
of the block share, depends on no query after any of them (causality). The block score is
``q_bar_I . k_bar_J``. Every query block keeps its own (diagonal) block plus the ``m = ceil(top_k
/ B)`` strictly earlier key blocks J < I with the highest block scores (fewer when fewer exist).
Each query then attends to the exact top-k tokens, by token score, among the causal keys of those
``m + 1`` blocks. How this differs from exact mode:

1. a key outside the chosen blocks is never selected, even if its token score is in the exact
   top-k (the block choice is shared by the B queries of a block and made on pooled vectors; NSA
   instead chooses blocks per query, which costs a per-query gather of candidate keys);
2. a query may therefore see fewer than k keys even when i + 1 >= k (e.g. the first queries of
   a block whose chosen earlier blocks were few);
3. when all earlier blocks fit in the selection (``m + 1 >= I + 1``, e.g. ``seq <= (m + 1) * B``),
   every causal key is a candidate and block mode equals exact mode.

Block mode is O(n * (n / B + k)) in time and memory (never n x n): block scores are (n/B)^2,
candidate scores n * (m + 1) * B with ``(m + 1) * B <= top_k + 2B``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from mla.tensor_ops import block_chunks, check_qkv, num_blocks, pad_seq, repeat_kv

#: Queries scored at once by the exact indexer (bounds its scoring memory to chunk x n).
EXACT_CHUNK = 1024


def global_topk_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, top_k: int,
                          indexer: str = "block", block: int = 64) -> torch.Tensor:
    """Sparse causal top-k attention (see the module docstring for both indexers).

    Args:
        q: Queries ``(batch, heads, seq, head_dim)``.
        k: Keys ``(batch, kv_heads, seq, head_dim)``; ``kv_heads`` divides ``heads`` (GQA).
        v: Values, shaped like ``k``.
        top_k: Keys per query k >= 1; ``k >= seq`` keeps every causal key.
        indexer: ``"exact"`` or ``"block"``.
        block: Block size B of the block indexer, in tokens.

    Returns:
        ``(batch, heads, seq, head_dim)``.

    Raises:
        ValueError: bad shapes, ``top_k`` or ``block`` < 1, or an unknown ``indexer``.
    """
    check_qkv(q, k, v)
    k, v = repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1])
    _positive("top_k", top_k)
    if indexer == "exact":
        return exact_topk_attention(q, k, v, top_k)
    if indexer == "block":
        return block_topk_attention(q, k, v, top_k, _positive("block", block))
    raise ValueError(f"indexer={indexer!r} must be 'exact' or 'block'")


# --------------------------------------------------------------------------- exact indexer

@torch.no_grad()
def exact_topk_indices(q: torch.Tensor, k: torch.Tensor, top_k: int,
                       chunk: int = EXACT_CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
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
        s = q[:, :, start:start + chunk] @ k.transpose(-1, -2)
        qpos = torch.arange(start, start + s.shape[-2], device=q.device).unsqueeze(-1)
        s = s.masked_fill(torch.arange(n, device=q.device) > qpos, float("-inf"))
        vals, ids = s.topk(kk, dim=-1)
        idx.append(ids)
        valid.append(torch.isfinite(vals))
    return torch.cat(idx, dim=-2), torch.cat(valid, dim=-2)


def exact_topk_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, top_k: int) -> torch.Tensor:
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


# --------------------------------------------------------------------------- block indexer

@torch.no_grad()
def select_key_blocks(q: torch.Tensor, k: torch.Tensor, top_k: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose key blocks per query block from pooled queries and keys (NSA-style, causal).

    Args:
        q, k: ``(batch, heads, seq, head_dim)``.
        top_k: k; ``m = ceil(k / block)`` earlier blocks are chosen (fewer if fewer exist).
        block: Block size B, in tokens.

    Returns:
        ``(blocks, valid)``, each ``(batch, heads, nb, m + 1)`` with ``nb = ceil(seq / B)``:
        column 0 is the diagonal block ``I`` itself, columns 1..m the chosen earlier blocks
        ``J < I`` by descending ``q_bar_I . k_bar_J`` (:func:`causal_query_means`,
        :func:`_block_means`); ``valid`` is False for padding
        choices of blocks with fewer than m earlier blocks.
    """
    nb = num_blocks(q.shape[-2], block)
    q_bar, k_bar = causal_query_means(q, block), _block_means(k, block)
    scores = q_bar @ k_bar.transpose(-1, -2)  # (b, h, nb, nb)
    ar = torch.arange(nb, device=q.device)
    scores = scores.masked_fill(ar.view(1, -1) >= ar.view(-1, 1), float("-inf"))
    diag = ar.view(1, 1, nb, 1).expand(*q.shape[:2], nb, 1)
    m = min(num_blocks(top_k, block), nb - 1)
    if m == 0:
        return diag, torch.ones_like(diag, dtype=torch.bool)
    vals, chosen = scores.topk(m, dim=-1)
    valid = torch.cat([torch.ones_like(diag, dtype=torch.bool), torch.isfinite(vals)], dim=-1)
    return torch.cat([diag, chosen], dim=-1), valid


def causal_query_means(q: torch.Tensor, block: int) -> torch.Tensor:
    """Summary query of each query block: the mean of ``q[I*B - B + 1 .. I*B]`` (clipped at 0).

    Args:
        q: ``(batch, heads, seq, head_dim)``.
        block: B.

    Returns:
        ``(batch, heads, nb, head_dim)``; row I depends only on positions <= I*B.
    """
    n = q.shape[-2]
    nb = num_blocks(n, block)
    qp = pad_seq(q, block - 1, max(0, nb * block - n - block + 1))
    sums = qp[..., :nb * block, :].reshape(*q.shape[:-2], nb, block, q.shape[-1]).sum(-2)
    counts = torch.clamp(torch.arange(nb, device=q.device) * block + 1, max=block)
    return sums / counts.to(q.dtype).unsqueeze(-1)


def _block_means(x: torch.Tensor, block: int) -> torch.Tensor:
    """Mean of each block of ``block`` rows of ``x`` (``(..., seq, d)`` -> ``(..., nb, d)``);
    the last, partial block is averaged over its real rows only."""
    n = x.shape[-2]
    nb = num_blocks(n, block)
    sums = pad_seq(x, 0, nb * block - n).reshape(*x.shape[:-2], nb, block, x.shape[-1]).sum(-2)
    counts = torch.full((nb, 1), float(block), dtype=x.dtype, device=x.device)
    counts[-1] = n - (nb - 1) * block
    return sums / counts


def block_candidates(q: torch.Tensor, k: torch.Tensor, top_k: int, block: int):
    """Candidate key blocks of every query block and the token mask kept by the block indexer.

    Args:
        q, k: ``(batch, heads, seq, head_dim)``.
        top_k: k.
        block: B.

    Returns:
        ``(blocks, keep)``: ``blocks`` ``(batch, heads, nb, m + 1)`` chosen key blocks (see
        :func:`select_key_blocks`); ``keep`` ``(batch, heads, nb, B, (m + 1) * B)`` bool, True
        where query ``a`` of block ``I`` attends to candidate ``c`` (key ``blocks[c // B] * B + c
        % B``). Computed without gradient.
    """
    blocks, bvalid = select_key_blocks(q, k, top_k, block)
    with torch.no_grad():
        kb = _query_blocks(k, block).flatten(-2)
        scores = _query_blocks(q, block) @ _candidate_blocks(kb, blocks, q.shape[-1]).transpose(-1, -2)
        return blocks, token_topk_mask(scores, blocks, bvalid, block, top_k, first_block=0)


@torch.no_grad()
def token_topk_mask(scores: torch.Tensor, blocks: torch.Tensor, bvalid: torch.Tensor, block: int,
                    top_k: int, first_block: int) -> torch.Tensor:
    """Keep-mask of each query's top-k causal candidates (no gradient).

    Args:
        scores: ``(batch, heads, nc, B, C)`` query-candidate scores of query blocks
            ``first_block .. first_block + nc - 1``, ``C = (m + 1) * B``.
        blocks, bvalid: ``(batch, heads, nc, m + 1)``, from :func:`select_key_blocks`.
        block: B.
        top_k: k.
        first_block: Index of the first query block in ``scores``.

    Returns:
        ``(batch, heads, nc, B, C)`` bool: the candidate is causal, in a valid block, and among
        the query's ``min(k, C)`` best causal candidates.
    """
    causal = _candidate_causal_mask(blocks, bvalid, block, first_block)
    masked = scores.masked_fill(~causal, float("-inf"))
    vals, ids = masked.topk(min(top_k, scores.shape[-1]), dim=-1, sorted=False)
    return torch.zeros_like(causal).scatter_(-1, ids, torch.isfinite(vals))


def block_topk_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, top_k: int,
                         block: int) -> torch.Tensor:
    """Top-k attention restricted to the blocks chosen by :func:`select_key_blocks`.

    Candidate keys and values are gathered per query block, ``(batch, heads, nb, (m+1)*B,
    head_dim)``; scores are computed once, masked to each query's top-k causal candidates
    (:func:`token_topk_mask`) and soft-maxed over the kept ones. Query blocks are processed in
    chunks (:func:`mla.tensor_ops.block_chunks`) so no score tensor exceeds ``CHUNK_ELEMENTS``.

    Args:
        q, k, v: ``(batch, heads, seq, head_dim)`` (kv heads already repeated).
        top_k: k >= 1.
        block: B >= 1, in tokens.

    Returns:
        ``(batch, heads, seq, head_dim)``.
    """
    b, h, n, d = q.shape
    blocks, bvalid = select_key_blocks(q, k, top_k, block)
    qb = _query_blocks(q * (1.0 / math.sqrt(d)), block)
    kb, vb = _query_blocks(k, block).flatten(-2), _query_blocks(v, block).flatten(-2)
    outs = []
    for c0, c1 in block_chunks(blocks.shape[2], b * h * block * blocks.shape[-1] * block):
        sel, ok = blocks[:, :, c0:c1], bvalid[:, :, c0:c1]
        kc, vc = _candidate_blocks(kb, sel, d), _candidate_blocks(vb, sel, d)
        scores = qb[:, :, c0:c1] @ kc.transpose(-1, -2)
        keep = token_topk_mask(scores.detach(), sel, ok, block, top_k, first_block=c0)
        outs.append(scores.masked_fill_(~keep, float("-inf")).softmax(dim=-1) @ vc)
    return torch.cat(outs, dim=2).reshape(b, h, -1, d)[..., :n, :]


def _query_blocks(q: torch.Tensor, block: int) -> torch.Tensor:
    """``(b, h, seq, d)`` -> zero-padded ``(b, h, nb, B, d)``."""
    nb = num_blocks(q.shape[-2], block)
    return pad_seq(q, 0, nb * block - q.shape[-2]).reshape(*q.shape[:2], nb, block, q.shape[-1])


def _candidate_blocks(xb: torch.Tensor, blocks: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Rows of the chosen blocks: ``xb`` ``(b, h, nb, B * d)``, ``blocks`` ``(b, h, nc, m + 1)``
    -> ``(b, h, nc, (m + 1) * B, d)``."""
    rows = gather_rows(xb, blocks)  # (b, h, nc, m + 1, B * d)
    return rows.reshape(*blocks.shape[:3], -1, head_dim)


def _candidate_causal_mask(blocks: torch.Tensor, bvalid: torch.Tensor, block: int,
                           first_block: int) -> torch.Tensor:
    """``(b, h, nc, B, (m + 1) * B)``: candidate key position <= query position, valid block."""
    nc = blocks.shape[2]
    ar = torch.arange(block, device=blocks.device)
    kpos = (blocks.unsqueeze(-1) * block + ar).flatten(-2)  # (b, h, nc, C)
    kvalid = bvalid.unsqueeze(-1).expand(*bvalid.shape, block).flatten(-2)
    qpos = torch.arange(first_block, first_block + nc, device=blocks.device).view(nc, 1) * block + ar
    return (kpos.unsqueeze(-2) <= qpos.unsqueeze(-1)) & kvalid.unsqueeze(-2)


def _positive(name: str, value: int) -> int:
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} must be a positive integer")
    return value
