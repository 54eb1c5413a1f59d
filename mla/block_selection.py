"""Block selection of the global branch: which key blocks each query block attends to.

This is the selection branch of Native Sparse Attention (Yuan et al. 2025, arXiv:2502.11089,
Sec. 3.3.2 and Eq. 10) made at query-block level, so that one choice serves the B queries of a
block and every backend (CPU blocked path, FlexAttention BlockMask, KV-cache decoding) consumes the
same list of whole key blocks. It is the one definition every backend and both references use.

Semantics (``n`` tokens, block size ``B``, ``nb = ceil(n / B)`` blocks; block ``I`` holds
positions ``I*B .. min(n, I*B + B) - 1``; ``Hq`` query heads in ``Hkv`` groups of ``G = Hq / Hkv``,
query head ``h`` reads key/value head ``h // G``):

1. **Pooled keys** (:func:`pooled_keys`): ``k_bar[h', J] = mean(k[h', J*B .. J*B + B - 1])``
   over the real positions of key block J (only the last block can be partial, and it is never
   an *earlier* block of anyone, so it is never selected).
2. **Causal pooled queries** (:func:`pooled_queries`): ``q_bar[h, I] = mean(q[h, max(0, I*B - B + 1)
   .. I*B])``, the B queries *ending at the block's first position* (fewer for I = 0). The choice
   of block I therefore depends on no position after ``I*B``, the first query of the block, and
   is causal for every query of the block.
3. **Group scores** (:func:`block_scores`): ``S[h', I, J] = sum_{h : h // G = h'} q_bar[h, I] .
   k_bar[h', J]``, computed as ``(sum_h q_bar[h, I]) . k_bar[h', J]`` (NSA Eq. 10 sums the
   importance over the group's heads, so one selection serves the whole GQA group). Scores are
   computed in the input dtype promoted to at least float32; ``J >= I`` is ``-inf``.
4. **Selection** (:func:`select_blocks`): ``n_sel = ceil(global_k / B)``
   (:func:`num_selected_blocks`); block I keeps the ``min(n_sel, I)`` strictly earlier blocks
   ``J < I`` with the highest ``S[h', I, J]``, in descending order of score (ties as
   ``torch.topk`` breaks them).
5. **Attention** (what the references and every backend compute from a selection): query ``i`` of
   block ``I = i // B`` attends, with a softmax of its own, to every key ``j <= i`` whose block
   ``j // B`` is ``I`` (the diagonal block, causally) or one of ``I``'s selected blocks. So
   ``global_k`` is a budget of *earlier* keys rounded up to whole blocks: each query sees up to
   ``(n_sel + 1) * B`` keys (``n_sel * B`` earlier ones plus at most B of its own block), and
   exactly all its causal keys when ``n <= (n_sel + 1) * B``.

Public API (stable; the KV-cache decoder builds on it):

* ``num_selected_blocks(global_k, block) -> int``
* ``pooled_keys(k, block) -> (batch, kv_heads, nb, head_dim)``
* ``pooled_queries(q, block, kv_heads) -> (batch, kv_heads, nb, head_dim)`` (summed over the group)
* ``block_scores(q, k, block) -> (batch, kv_heads, nb, nb)``
* ``select_blocks(q, k, global_k, block) -> BlockSelection(indices, counts)``
* ``selection_token_mask(selection, seq_len, block, n_heads) -> (batch, n_heads, seq, seq)`` bool

:mod:`mla.reference` holds the brute-force loop of the same rule
(:func:`mla.reference.reference_select_blocks`) and the dense masked attention built from a
selection (:func:`mla.reference.block_selection_reference_attention`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from mla.tensor_ops import num_blocks, pad_seq


class BlockSelection(NamedTuple):
    """The key blocks chosen for every query block, per key/value head.

    Attributes:
        indices: int64 ``(batch, kv_heads, nb, width)`` with ``width = min(n_sel, nb - 1)``
            (``0`` when ``nb == 1``): ``indices[b, h', I, c]`` for ``c < counts[..., I]`` is the
            c-th best earlier block ``J < I``; the rest are ``-1`` (padding).
        counts: int64 ``(batch, kv_heads, nb)``: ``min(n_sel, I)``, the number of valid entries.
    """

    indices: torch.Tensor
    counts: torch.Tensor


def num_selected_blocks(global_k: int, block: int) -> int:
    """``n_sel = ceil(global_k / block)``: earlier key blocks each query block selects.

    Example: ``global_k=16, block=64`` -> 1; ``global_k=128, block=64`` -> 2.

    Raises:
        ValueError: ``global_k`` or ``block`` is not a positive integer.
    """
    for name, value in (("global_k", global_k), ("block", block)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} must be a positive integer number of tokens")
    return num_blocks(global_k, block)


def _score_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def pooled_keys(k: torch.Tensor, block: int) -> torch.Tensor:
    """Mean key of every key block (rule 1 of the module docstring).

    Args:
        k: Keys ``(batch, kv_heads, seq, head_dim)``.
        block: Block size B, in tokens.

    Returns:
        ``(batch, kv_heads, nb, head_dim)`` in ``k``'s dtype promoted to at least float32; the
        last, partial block is averaged over its real positions.
    """
    n = k.shape[-2]
    nb = num_blocks(n, block)
    x = pad_seq(k.to(_score_dtype(k)), 0, nb * block - n)
    sums = x.reshape(*k.shape[:-2], nb, block, k.shape[-1]).sum(-2)
    counts = torch.full((nb, 1), float(block), dtype=sums.dtype, device=k.device)
    counts[-1] = n - (nb - 1) * block
    return sums / counts


def pooled_queries(q: torch.Tensor, block: int, kv_heads: int) -> torch.Tensor:
    """Causal pooled query of every query block, summed over each GQA group (rules 2 and 3).

    Args:
        q: Queries ``(batch, heads, seq, head_dim)``; ``kv_heads`` divides ``heads``.
        block: Block size B, in tokens.
        kv_heads: Number of key/value heads Hkv (groups of ``heads // kv_heads`` query heads).

    Returns:
        ``(batch, kv_heads, nb, head_dim)``: ``sum_{h in group} mean(q[h, max(0, I*B-B+1) ..
        I*B])``; row I depends only on positions ``<= I*B``.

    Raises:
        ValueError: ``kv_heads`` does not divide the number of query heads.
    """
    b, heads, n, d = q.shape
    if kv_heads < 1 or heads % kv_heads:
        raise ValueError(
            f"query heads ({heads}) must be a multiple of key/value heads ({kv_heads})"
        )
    nb = num_blocks(n, block)
    x = q.to(_score_dtype(q))
    x = pad_seq(x, block - 1, max(0, nb * block - n - block + 1))[..., : nb * block, :]
    sums = x.reshape(b, heads, nb, block, d).sum(-2)
    counts = torch.clamp(torch.arange(nb, device=q.device) * block + 1, max=block)
    means = sums / counts.to(sums.dtype).unsqueeze(-1)
    return means.view(b, kv_heads, heads // kv_heads, nb, d).sum(2)


def block_scores(q: torch.Tensor, k: torch.Tensor, block: int) -> torch.Tensor:
    """Group block scores ``S[b, h', I, J]`` with ``-inf`` for ``J >= I`` (rule 3).

    Args:
        q: Queries ``(batch, heads, seq, head_dim)``.
        k: Keys ``(batch, kv_heads, seq, head_dim)``.
        block: Block size B, in tokens.

    Returns:
        ``(batch, kv_heads, nb, nb)`` float (at least float32).
    """
    q_bar, k_bar = pooled_queries(q, block, k.shape[1]), pooled_keys(k, block)
    scores = q_bar @ k_bar.transpose(-1, -2)
    ar = torch.arange(scores.shape[-1], device=q.device)
    return scores.masked_fill(ar.view(1, -1) >= ar.view(-1, 1), float("-inf"))


@torch.no_grad()
def select_blocks(q: torch.Tensor, k: torch.Tensor, global_k: int, block: int) -> BlockSelection:
    """Choose the earlier key blocks of every query block (rules 1-4; no gradient).

    Shapes depend only on the input shapes and ``(global_k, block)``, and the function has no
    data-dependent Python control flow, so it traces into one ``torch.compile(fullgraph=True)``
    graph.

    Args:
        q: Queries ``(batch, heads, seq, head_dim)`` (rotary embedding applied).
        k: Keys ``(batch, kv_heads, seq, head_dim)``; ``kv_heads`` divides ``heads``.
        global_k: Budget of earlier keys per query, in tokens; ``n_sel = ceil(global_k / block)``.
        block: Block size B, in tokens.

    Returns:
        :class:`BlockSelection` (``indices`` ``(batch, kv_heads, nb, min(n_sel, nb - 1))``,
        ``counts`` ``(batch, kv_heads, nb)``).

    Raises:
        ValueError: ``global_k`` or ``block`` < 1, or the head counts do not divide.
    """
    n_sel = num_selected_blocks(global_k, block)
    scores = block_scores(q, k, block)
    nb = scores.shape[-1]
    width = min(n_sel, nb - 1)
    counts = torch.clamp(torch.arange(nb, device=q.device), max=width).expand(*scores.shape[:3])
    _, idx = scores.topk(width, dim=-1, sorted=True)
    valid = torch.arange(width, device=q.device) < counts.unsqueeze(-1)
    return BlockSelection(idx.masked_fill(~valid, -1), counts.contiguous())


def selection_token_mask(
    selection: BlockSelection, seq_len: int, block: int, n_heads: int
) -> torch.Tensor:
    """Token-level keep-mask of the global branch built from a selection (rule 5).

    Args:
        selection: From :func:`select_blocks` (or :func:`mla.reference.reference_select_blocks`).
        seq_len: n, in tokens.
        block: Block size B, in tokens.
        n_heads: Query heads Hq (a multiple of the selection's kv heads).

    Returns:
        ``(batch, n_heads, seq, seq)`` bool: True where query ``i`` attends to key ``j``, i.e.
        ``j <= i`` and ``j // B`` is ``i // B`` or a valid selected block of ``i // B``.
    """
    idx, counts = selection
    b, hkv, nb, width = idx.shape
    ok = torch.arange(width, device=idx.device) < counts.unsqueeze(-1)
    allowed = torch.zeros(b, hkv, nb, nb + 1, dtype=torch.bool, device=idx.device)
    allowed.scatter_(-1, torch.where(ok, idx, nb), True)  # column nb swallows padding
    allowed = allowed[..., :nb] | torch.eye(nb, dtype=torch.bool, device=idx.device)
    pos = torch.arange(seq_len, device=idx.device)
    blk = pos // block
    tokens = allowed[:, :, blk][..., blk]  # (b, hkv, n, n)
    causal = pos.view(1, -1) <= pos.view(-1, 1)
    return (tokens & causal).repeat_interleave(n_heads // hkv, dim=1)
