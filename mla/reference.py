"""Dense, obviously-correct reference of multi-level attention with explicit n x n masks.

Slow (O(n^2) memory) and meant for tests: the efficient paths in :mod:`mla.local_attention` and
:mod:`mla.global_attention` must match it in outputs and gradients.
"""

from __future__ import annotations

import math

import torch


def dense_reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gate: torch.Tensor | None,
                              *, window: int, top_k: int,
                              global_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Multi-level attention from explicit masks: local band, global top-k, softmax per branch.

    Args:
        q: ``(batch, heads, seq, head_dim)``.
        k, v: ``(batch, kv_heads, seq, head_dim)``; kv heads are repeated for GQA.
        gate: ``(batch, heads, seq)`` in [0, 1], or ``None`` to sum the branches.
        window: w; local mask ``i - w < j <= i`` (Longformer sliding window).
        top_k: k; global mask = the k highest causal scores per query (all causal keys if fewer).
        global_mask: Optional ``(batch, heads, seq, seq)`` bool mask replacing the exact top-k
            mask (e.g. from :func:`block_indexer_reference_mask`).

    Returns:
        ``(batch, heads, seq, head_dim)``: ``g * local + (1 - g) * global`` or their sum.
    """
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    i = torch.arange(q.shape[-2], device=q.device)
    delta = i.view(-1, 1) - i.view(1, -1)
    local_mask = (delta >= 0) & (delta < window)
    if global_mask is None:
        global_mask = exact_topk_reference_mask(s.detach(), top_k)
    local = _masked_softmax(s, local_mask) @ v
    glob = _masked_softmax(s, global_mask) @ v
    if gate is None:
        return local + glob
    g = gate.unsqueeze(-1)
    return g * local + (1 - g) * glob


def exact_topk_reference_mask(scores: torch.Tensor, top_k: int) -> torch.Tensor:
    """Boolean ``(..., seq, seq)`` mask of the top-k causal scores of each query row.

    Args:
        scores: ``(..., seq, seq)`` attention scores.
        top_k: k; rows with fewer than k causal keys keep all of them.
    """
    n = scores.shape[-1]
    i = torch.arange(n, device=scores.device)
    causal = i.view(1, -1) <= i.view(-1, 1)
    masked = scores.masked_fill(~causal, float("-inf"))
    vals, idx = masked.topk(min(top_k, n), dim=-1)
    return torch.zeros_like(causal.expand_as(scores)).scatter(-1, idx, torch.isfinite(vals))


def block_indexer_reference_mask(q: torch.Tensor, k: torch.Tensor, top_k: int, block: int) -> torch.Tensor:
    """Token mask chosen by the block indexer, written as plain loops over queries.

    Implements the rule of :mod:`mla.global_attention` independently of it: for query i in
    block ``I = i // B``, take the diagonal block I plus the ``min(ceil(k/B), I)`` earlier
    blocks J with the highest ``mean(q[I*B-B+1 .. I*B]) . mean(k in J)`` (means over real
    positions), then the
    top-k causal tokens of those blocks by ``q_i . k_j``.

    Args:
        q: ``(batch, heads, seq, head_dim)``.
        k: ``(batch, kv_heads, seq, head_dim)``.
        top_k: k.
        block: B.

    Returns:
        ``(batch, heads, seq, seq)`` bool.
    """
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    b, h, n, _ = q.shape
    mask = torch.zeros(b, h, n, n, dtype=torch.bool, device=q.device)
    m = -(-top_k // block)
    for bi in range(b):
        for hi in range(h):
            for i in range(n):
                cand = _reference_candidates(q[bi, hi], k[bi, hi], i, m, block)
                scores = k[bi, hi, cand] @ q[bi, hi, i]
                keep = scores.topk(min(top_k, len(cand))).indices
                mask[bi, hi, i, torch.tensor(cand, device=q.device)[keep]] = True
    return mask


def _reference_candidates(q: torch.Tensor, k: torch.Tensor, i: int, m: int, block: int) -> list[int]:
    """Causal key positions (``<= i``) of the blocks the indexer gives query ``i``."""
    n = q.shape[0]
    qi = i // block
    q_bar = q[max(0, qi * block - block + 1):qi * block + 1].mean(0)
    block_scores = [float(q_bar @ k[j * block:(j + 1) * block].mean(0)) for j in range(qi)]
    chosen = sorted(range(qi), key=lambda j: -block_scores[j])[:m]
    return [j for blk in [qi, *chosen] for j in range(blk * block, min(n, (blk + 1) * block)) if j <= i]


def _masked_softmax(s: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Row softmax of ``s`` over the True entries of ``mask`` (each row keeps at least one)."""
    return s.masked_fill(~mask, float("-inf")).softmax(dim=-1)
