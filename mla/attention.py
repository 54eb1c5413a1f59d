"""Dynamic Multi-Level Attention: a local sliding-window branch and a sparse global branch,
mixed per head by a learned sigmoid gate.

For query i (causal), with ``s_ij = q_i . k_j / sqrt(d)``:

* local:  ``L_i = sum_{i-w < j <= i} softmax_j(s_ij) v_j`` (Longformer's sliding window);
* global: ``G_i = sum_{j in T(i)} softmax_j(s_ij) v_j`` where ``T(i)`` is, for
  ``indexer="block"``, the causal keys of i's own block and of the ``ceil(global_k / B)`` earlier
  key blocks selected for its block (:mod:`mla.block_selection`), or, for ``indexer="exact"``
  (reference option), the exact token-level top-k causal keys (:mod:`mla.global_attention`);
* mix: ``out_i = g_i * L_i + (1 - g_i) * G_i`` with ``g = sigmoid(W_gate x + b)`` per head
  (``mix="gate"``), ``out_i = L_i + G_i`` (``mix="sum"``), or ``out_i = L_i`` (``mix="local"``:
  window-only, the global branch switched off; the ablation of the global branch).

The core (:func:`multi_level_attention`) works on ``(batch, heads, seq, head_dim)`` tensors, so a
tensor-parallel wrapper can call it with only its local heads. Backends, all held to the dense
references of :mod:`mla.reference`: on CUDA with ``indexer="block"`` and a block size that is a
multiple of 128, one compiled FlexAttention region (:mod:`mla.flex_attention`); elsewhere the
blocked sliding window (:mod:`mla.local_attention`) plus the blocked block-selection branch
(:mod:`mla.global_attention`). :class:`MultiLevelAttention` adds
the projections (``wq``, ``wk``, ``wv``, ``wo``, ``w_gate``) and rotary embeddings.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mla.config import ModelConfig
from mla.flex_attention import flex_backend, flex_multi_level_attention
from mla.global_attention import global_topk_attention
from mla.local_attention import local_attention
from mla.rope import apply_rope, rope_cache
from mla.tensor_ops import check_qkv

__all__ = [
    "MultiLevelAttention",
    "multi_level_attention",
    "local_attention",
    "global_topk_attention",
]


def multi_level_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gate: torch.Tensor | None,
    *,
    window: int,
    top_k: int,
    indexer: str = "block",
    block: int = 64,
) -> torch.Tensor:
    """Causal multi-level attention core (local + global branch, gated or summed).

    Args:
        q: Queries ``(batch, heads, seq, head_dim)`` (rotary embedding already applied).
        k: Keys ``(batch, kv_heads, seq, head_dim)``; ``kv_heads`` divides ``heads`` (GQA).
        v: Values, shaped like ``k``.
        gate: Mixing weights in [0, 1], ``(batch, heads, seq)``; ``None`` sums the branches.
        window: Sliding window w of the local branch, in tokens.
        top_k: ``global_k``: earlier-key budget of the block selection (``ceil(top_k / block)``
            blocks) or, for ``indexer="exact"``, keys per query.
        indexer: ``"block"`` or ``"exact"`` (global branch key selection).
        block: Block size B of the block selection and of the blocked local branch, in tokens.

    Returns:
        ``(batch, heads, seq, head_dim)``: ``g * local + (1 - g) * global`` (or their sum).

    Raises:
        ValueError: shapes disagree, ``gate`` is not ``(batch, heads, seq)``, or a size is < 1.
    """
    check_qkv(q, k, v)
    if gate is not None and gate.shape != q.shape[:3]:
        raise ValueError(
            f"gate must be (batch, heads, seq) = {tuple(q.shape[:3])}, got {tuple(gate.shape)}"
        )
    if indexer == "block" and flex_backend(q, block, k, v, gate) == "flex":
        return flex_multi_level_attention(q, k, v, gate, window=window, top_k=top_k, block=block)
    local = local_attention(q, k, v, window, block)
    glob = global_topk_attention(q, k, v, top_k, indexer, block)
    if gate is None:
        return local + glob
    g = gate.unsqueeze(-1).to(local.dtype)
    return g * local + (1 - g) * glob


class MultiLevelAttention(nn.Module):
    """Attention layer of an MLA block: projections, rotary embedding, MLA core (or dense SDPA).

    Parameters (all ``bias=False`` except the gate): ``wq`` (d -> H*hd), ``wk`` and ``wv``
    (d -> kv*hd), ``wo`` (H*hd -> d), and ``w_gate`` (d -> H, with bias) only when
    ``cfg.attention == "mla"`` and ``cfg.mix == "gate"``. The rotary cos/sin cache is a
    non-persistent buffer built for ``cfg.max_seq_len`` positions.

    Args:
        cfg: Model configuration.
        layer_idx: Index of the block holding this layer (for diagnostics only).
    """

    def __init__(self, cfg: ModelConfig, layer_idx: int = 0) -> None:
        super().__init__()
        self.cfg, self.layer_idx = cfg, layer_idx
        d, h, kv, hd = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.wq = nn.Linear(d, h * hd, bias=False)
        self.wk = nn.Linear(d, kv * hd, bias=False)
        self.wv = nn.Linear(d, kv * hd, bias=False)
        self.wo = nn.Linear(h * hd, d, bias=False)
        self.w_gate = (
            nn.Linear(d, h, bias=True) if cfg.attention == "mla" and cfg.mix == "gate" else None
        )
        self.dropout = nn.Dropout(cfg.dropout)
        cos, sin = rope_cache(cfg.max_seq_len, hd, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply attention to ``x`` ``(batch, seq, d_model)``; returns the same shape.

        Raises:
            ValueError: ``seq > cfg.max_seq_len`` (the rotary cache is too short).
        """
        b, s, _ = x.shape
        if s > self.cfg.max_seq_len:
            raise ValueError(
                f"sequence length {s} exceeds max_seq_len={self.cfg.max_seq_len}; "
                "raise model.max_seq_len or shorten the sequence"
            )
        q, k, v = self._project(x)
        if self.cfg.attention == "dense":
            o = F.scaled_dot_product_attention(
                q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1]
            )
        elif self.cfg.mix == "local":
            o = local_attention(q, k, v, self.cfg.local_window, self.cfg.block_size)
        else:
            o = multi_level_attention(
                q,
                k,
                v,
                self._gate(x),
                window=self.cfg.local_window,
                top_k=self.cfg.global_k,
                indexer=self.cfg.indexer,
                block=self.cfg.block_size,
            )
        return self.dropout(self.wo(o.transpose(1, 2).reshape(b, s, -1)))

    def _project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return rotated q ``(b, H, s, hd)``, rotated k and v ``(b, kv, s, hd)``."""
        b, s, _ = x.shape
        hd = self.cfg.head_dim
        q = self.wq(x).view(b, s, -1, hd).transpose(1, 2)
        k = self.wk(x).view(b, s, -1, hd).transpose(1, 2)
        v = self.wv(x).view(b, s, -1, hd).transpose(1, 2)
        return (
            apply_rope(q, self.rope_cos, self.rope_sin),
            apply_rope(k, self.rope_cos, self.rope_sin),
            v,
        )

    def _gate(self, x: torch.Tensor) -> torch.Tensor | None:
        """Weight of the local branch ``(batch, heads, seq)``: ``sigmoid(w_gate(x))``
        (``mix="gate"``), ones (``mix="local"``: the global branch gets weight 0, as the KV-cache
        decoder needs), or ``None`` (``mix="sum"``)."""
        if self.cfg.mix == "local":
            return x.new_ones(x.shape[0], self.cfg.n_heads, x.shape[1])
        if self.w_gate is None:
            return None
        return torch.sigmoid(self.w_gate(x)).transpose(1, 2)
