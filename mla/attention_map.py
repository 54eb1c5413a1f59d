"""The effective attention matrix of one MLA layer, from the dense reference path.

MLA mixes two softmax branches per head with the gate g (:mod:`mla.attention`), so the weight a
query i puts on key j is

    A[i, j] = g_i * softmax_local(s)[i, j] + (1 - g_i) * softmax_global(s)[i, j]

with ``s = q k^T / sqrt(d_head)``, the local branch on the band ``0 <= i - j < w`` and the
global branch on the keys the indexer chose (the block selection's token mask, or the exact
causal top-k); for ``mix="sum"`` the branches are added (rows then sum to 2), for
``mix="local"`` (window-only ablation) A is the local softmax alone. Each row of A sums
to 1 for the gated mix. O(n^2) per head: meant for probe sequences of a few hundred tokens
(``../shared/anchors/observability/REPORT.md`` §3.6).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import cast

import torch

from mla.attention import MultiLevelAttention
from mla.block_selection import select_blocks, selection_token_mask
from mla.config import ModelConfig
from mla.model import MLATransformer
from mla.reference import exact_topk_reference_mask


@dataclass(frozen=True)
class AttentionMap:
    """One layer's effective attention on a sequence.

    Attributes:
        weights: ``(heads, seq, seq)`` effective attention A (rows sum to 1 for ``mix="gate"``).
        local_mask: ``(seq, seq)`` bool, the sliding-window band.
        global_mask: ``(heads, seq, seq)`` bool, the keys of the global branch.
        gate: ``(heads, seq)`` gate g per query (ones for ``mix="sum"``: no gate).
    """

    weights: torch.Tensor
    local_mask: torch.Tensor
    global_mask: torch.Tensor
    gate: torch.Tensor


@torch.no_grad()
def effective_attention(model: MLATransformer, tokens: torch.Tensor, layer: int) -> AttentionMap:
    """The effective attention of block ``layer`` of ``model`` on ``tokens``.

    Args:
        model: An MLA model (``attention="mla"``).
        tokens: ``(seq,)`` token ids, ``seq <= cfg.max_seq_len``.
        layer: Block index, ``0 <= layer < n_layers``.

    Returns:
        :class:`AttentionMap` of batch row 0.

    Raises:
        ValueError: dense attention (no branches to show), or ``layer`` out of range.
    """
    cfg = model.cfg
    if cfg.attention != "mla":
        raise ValueError(f"attention={cfg.attention!r}: the map needs an MLA model")
    if not 0 <= layer < cfg.n_layers:
        raise ValueError(f"layer={layer} outside 0..{cfg.n_layers - 1}")
    attn = cast(MultiLevelAttention, model.blocks[layer].attn)
    captured: dict[str, torch.Tensor] = {}
    handle = attn.register_forward_pre_hook(lambda _m, args: captured.setdefault("x", args[0]))
    try:
        model(tokens.view(1, -1))
    finally:
        handle.remove()
    return attention_map_from_input(attn, captured["x"][:1], cfg)


@torch.no_grad()
def attention_map_from_input(
    attn: MultiLevelAttention, x: torch.Tensor, cfg: ModelConfig
) -> AttentionMap:
    """The effective attention of an :class:`mla.attention.MultiLevelAttention` on its input.

    Args:
        attn: The attention layer (not tensor-parallel: it must hold every head).
        x: ``(1, seq, d_model)``: what the layer received (the normed residual stream).
        cfg: The model's shape and attention settings.

    Returns:
        :class:`AttentionMap`.
    """
    q, k, _ = attn._project(x)
    gate = attn._gate(x)
    n = q.shape[-2]
    rep = q.shape[1] // k.shape[1]
    scores = q @ k.repeat_interleave(rep, dim=1).transpose(-1, -2) / math.sqrt(q.shape[-1])
    i = torch.arange(n, device=q.device)
    delta = i.view(-1, 1) - i.view(1, -1)
    local_mask = (delta >= 0) & (delta < cfg.local_window)
    if cfg.indexer == "block":
        selection = select_blocks(q, k, cfg.global_k, cfg.block_size)
        global_mask = selection_token_mask(selection, n, cfg.block_size, q.shape[1])
    else:
        global_mask = exact_topk_reference_mask(scores, cfg.global_k)
    local = scores.masked_fill(~local_mask, float("-inf")).softmax(-1)
    glob = scores.masked_fill(~global_mask, float("-inf")).softmax(-1)
    g = torch.ones(q.shape[:3], device=q.device) if gate is None else gate
    if cfg.mix == "local":  # window-only ablation: the global branch is switched off
        weights = local
    elif gate is None:  # mix="sum"
        weights = local + glob
    else:
        weights = g.unsqueeze(-1) * local + (1 - g.unsqueeze(-1)) * glob
    return AttentionMap(
        weights[0].float().cpu(), local_mask.cpu(), global_mask[0].cpu(), g[0].float().cpu()
    )
