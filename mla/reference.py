"""Dense, obviously-correct reference of multi-level attention with explicit n x n masks.

Slow (O(n^2) memory) and meant for tests: every efficient path (:mod:`mla.local_attention`,
:mod:`mla.global_attention`, :mod:`mla.flex_attention`) must match it in outputs and gradients.

* :func:`dense_reference_attention`: local band + a global token mask (exact top-k by default);
* :func:`reference_select_blocks`: the block selection of :mod:`mla.block_selection` as loops;
* :func:`block_selection_reference_attention`: the dense masked attention built from a block
  selection (the reference of ``indexer="block"``).
"""

from __future__ import annotations

import math

import torch

from mla.block_selection import BlockSelection, selection_token_mask


def dense_reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gate: torch.Tensor | None,
    *,
    window: int,
    top_k: int,
    global_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Multi-level attention from explicit masks: local band, global top-k, softmax per branch.

    Args:
        q: ``(batch, heads, seq, head_dim)``.
        k, v: ``(batch, kv_heads, seq, head_dim)``; kv heads are repeated for GQA.
        gate: ``(batch, heads, seq)`` in [0, 1], or ``None`` to sum the branches.
        window: w; local mask ``i - w < j <= i`` (Longformer sliding window).
        top_k: k; global mask = the k highest causal scores per query (all causal keys if fewer).
        global_mask: Optional ``(batch, heads, seq, seq)`` bool mask replacing the exact top-k
            mask (e.g. from :func:`mla.block_selection.selection_token_mask`).

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


def reference_select_blocks(
    q: torch.Tensor, k: torch.Tensor, global_k: int, block: int
) -> BlockSelection:
    """The block selection of :mod:`mla.block_selection`, written as plain loops (brute force).

    Independent of :func:`mla.block_selection.select_blocks`: for every batch row, key/value
    head h' and query block I, pool the queries ``q[h, max(0, I*B-B+1) .. I*B]`` of each query
    head h of the group (``h // G == h'``), score every earlier key block J < I by
    ``sum_h mean(q_h) . mean(k[h', J*B .. J*B+B-1])`` and keep the ``min(ceil(global_k / B), I)``
    best, best first. Computed in float64.

    Args:
        q: ``(batch, heads, seq, head_dim)``.
        k: ``(batch, kv_heads, seq, head_dim)``.
        global_k: Earlier-key budget, in tokens.
        block: Block size B, in tokens.

    Returns:
        :class:`mla.block_selection.BlockSelection`, same shapes and padding (``-1``).
    """
    b, heads, n, _ = q.shape
    hkv = k.shape[1]
    group = heads // hkv
    nb = -(-n // block)
    n_sel = -(-global_k // block)
    width = min(n_sel, nb - 1)
    idx = torch.full((b, hkv, nb, width), -1, dtype=torch.long)
    counts = torch.zeros(b, hkv, nb, dtype=torch.long)
    q64, k64 = q.detach().double().cpu(), k.detach().double().cpu()
    for bi in range(b):
        for hk in range(hkv):
            for qi in range(nb):
                lo = max(0, qi * block - block + 1)
                scores = []
                for j in range(qi):
                    k_bar = k64[bi, hk, j * block : (j + 1) * block].mean(0)
                    scores.append(
                        sum(
                            float(q64[bi, h, lo : qi * block + 1].mean(0) @ k_bar)
                            for h in range(hk * group, (hk + 1) * group)
                        )
                    )
                chosen = sorted(range(qi), key=lambda j: -scores[j])[:width]
                counts[bi, hk, qi] = len(chosen)
                idx[bi, hk, qi, : len(chosen)] = torch.tensor(chosen, dtype=torch.long)
    return BlockSelection(idx.to(q.device), counts.to(q.device))


def block_selection_reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gate: torch.Tensor | None,
    *,
    window: int,
    selection: BlockSelection,
    block: int,
) -> torch.Tensor:
    """Dense masked multi-level attention whose global branch attends to a block selection.

    The global mask is :func:`mla.block_selection.selection_token_mask` (query i sees the causal
    keys of its own block and of its selected blocks); the local mask is the band ``i - w < j <=
    i``; each branch has its own softmax; ``gate`` mixes them. O(n^2) memory: for tests.

    Args:
        q: ``(batch, heads, seq, head_dim)``.
        k, v: ``(batch, kv_heads, seq, head_dim)``.
        gate: ``(batch, heads, seq)`` in [0, 1], or ``None`` to sum the branches.
        window: Local window w, in tokens.
        selection: Block selection (``indices`` ``(batch, kv_heads, nb, width)``).
        block: Block size B of the selection, in tokens.

    Returns:
        ``(batch, heads, seq, head_dim)``.
    """
    mask = selection_token_mask(selection, q.shape[-2], block, q.shape[1])
    return dense_reference_attention(q, k, v, gate, window=window, top_k=1, global_mask=mask)


def _masked_softmax(s: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Row softmax of ``s`` over the True entries of ``mask`` (each row keeps at least one)."""
    return s.masked_fill(~mask, float("-inf")).softmax(dim=-1)
