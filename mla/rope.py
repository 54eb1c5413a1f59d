"""Rotary position embedding (RoPE; RoFormer, Su et al. 2021).

A position m rotates each pair of features (x_i, x_{i+d/2}) of a query or key by the angle
``m * theta^(-2i/d)`` (RoFormer eq. 15 with the "rotate-half" pairing of GPT-NeoX / LLaMA,
which is the paper's interleaved pairing up to a fixed permutation of the features). Then
``<R_m q, R_n k>`` depends only on ``m - n`` (RoFormer eq. 16).
"""

from __future__ import annotations

import torch


def rope_cache(
    max_seq_len: int, head_dim: int, theta: float = 10000.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Precompute cos and sin of the rotation angles (RoFormer eq. 15).

    Args:
        max_seq_len: Number of positions, in tokens.
        head_dim: Features per head; must be even.
        theta: Frequency base (10000 in the paper).

    Returns:
        ``(cos, sin)``, each of shape ``(max_seq_len, head_dim)`` in float32; columns ``i``
        and ``i + head_dim/2`` hold the same angle ``m * theta^(-2i/head_dim)``.

    Raises:
        ValueError: ``head_dim`` is odd.
    """
    if head_dim % 2:
        raise ValueError(
            f"rotary embedding needs an even head_dim, got head_dim={head_dim}; "
            "choose d_model / n_heads even"
        )
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().float(), angles.sin().float()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate queries or keys by their positions 0..S-1 (RoFormer eq. 34).

    Args:
        x: ``(batch, heads, seq, head_dim)``.
        cos: ``(>= seq, head_dim)`` from :func:`rope_cache`.
        sin: ``(>= seq, head_dim)`` from :func:`rope_cache`.

    Returns:
        Tensor of the shape and dtype of ``x``: ``x * cos + rotate_half(x) * sin``.
    """
    seq = x.shape[-2]
    c = cos[:seq].to(x.dtype)
    s = sin[:seq].to(x.dtype)
    return x * c + _rotate_half(x) * s


def apply_rope_at(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor
) -> torch.Tensor:
    """Rotate one query or key per batch row by that row's own position (incremental decoding).

    Same rotation as :func:`apply_rope` (RoFormer eq. 34), but position ``positions[b]`` for
    row ``b`` instead of ``0..seq-1``, so rows of a batch may sit at different positions.

    Args:
        x: ``(batch, heads, 1, head_dim)``.
        cos: ``(max_seq_len, head_dim)`` from :func:`rope_cache`.
        sin: ``(max_seq_len, head_dim)`` from :func:`rope_cache`.
        positions: ``(batch,)`` int64 positions, each ``< max_seq_len``.

    Returns:
        Tensor of the shape and dtype of ``x``.
    """
    c = cos[positions].to(x.dtype).view(x.shape[0], 1, 1, -1)
    s = sin[positions].to(x.dtype).view(x.shape[0], 1, 1, -1)
    return x * c + _rotate_half(x) * s
