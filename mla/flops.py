"""Parameter and training-FLOP counts of an MLA (or dense) transformer, in pure Python.

No torch import: the planner and the CLI use these counts without loading PyTorch. The counts
describe :class:`mla.MLATransformer` exactly (tied embedding and output head, pre-norm RMSNorm
blocks, grouped-query attention, SwiGLU MLP, optional per-head sigmoid gate).
"""

from __future__ import annotations

from mla.config import ModelConfig


def layer_parameters(cfg: ModelConfig) -> int:
    """Parameters of one transformer block.

    ``2d`` (two RMSNorm weights) + ``d·H·hd`` (query) + ``2·d·kv·hd`` (key, value) +
    ``H·hd·d`` (output projection) + ``d·H + H`` (gate, MLA with ``mix='gate'`` only) +
    ``3·d·ffn`` (SwiGLU gate, up and down matrices), with ``hd = d/H``, ``kv = n_kv_heads or H``.

    Example (preset ``tiny``: d=128, H=4, kv=4, ffn=352, gated MLA):
        256 + 16,384 + 32,768 + 16,384 + 516 + 135,168 = 201,476.
    """
    d, heads, hd, kv = cfg.d_model, cfg.n_heads, cfg.head_dim, cfg.kv_heads
    gate = d * heads + heads if (cfg.attention == "mla" and cfg.mix == "gate") else 0
    return 2 * d + d * heads * hd + 2 * d * kv * hd + heads * hd * d + gate + 3 * d * cfg.ffn_hidden


def count_parameters(cfg: ModelConfig) -> int:
    """Total trainable parameters.

    ``V·d`` (token embedding, tied with the output head) + ``L·layer_parameters`` + ``d`` (final
    RMSNorm).

    Example (``tiny``): 256·128 + 4·201,476 + 128 = 32,768 + 805,904 + 128 = **838,800**.
    """
    return cfg.vocab_size * cfg.d_model + cfg.n_layers * layer_parameters(cfg) + cfg.d_model


def attended_keys(cfg: ModelConfig, seq_len: int) -> int:
    """Keys each query attends to, for the attention FLOP term (PaLM's non-causal convention).

    Dense: ``T``. Window-only (``mix='local'``): ``min(w, T)``. MLA: ``min(w, T)`` (sliding window) plus the global span: with the block
    selection (``indexer='block'``) ``min((n_sel + 1)·B, T)`` with ``n_sel = ceil(k / B)``
    (the selected earlier blocks plus the whole diagonal block, as a block-sparse kernel
    computes them, :mod:`mla.block_selection`); with ``indexer='exact'`` ``min(k, T)``.

    Example: tiny (w=32, k=8, B=32, block selection) at T=256: 32 + (1 + 1)·32 = 96; the same
    with the exact indexer: 32 + 8 = 40; dense at T=256: 256.
    """
    if cfg.attention == "dense":
        return seq_len
    if cfg.mix == "local":
        return min(cfg.local_window, seq_len)
    if cfg.indexer == "block":
        span = (-(-cfg.global_k // cfg.block_size) + 1) * cfg.block_size
    else:
        span = cfg.global_k
    return min(cfg.local_window, seq_len) + min(span, seq_len)


def attention_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token of the attention scores and the weighted sum of values.

    PaLM App. B (Chowdhery et al. 2022, arXiv:2204.02311): ``12·L·H·hd·T``: 2 FLOPs per
    multiply-add, 2 matmuls (``QK^T`` and ``PV``), 3 for forward + backward, with the full (not
    causal-halved) span T, as formulas.md §5 uses. For MLA the span T becomes
    :func:`attended_keys`. The block selection (``indexer='block'``) adds its scoring: each
    query block's group-summed pooled query against the ``ceil(T/B)`` pooled key blocks, per
    key/value head, one forward-only matmul (the selection is not differentiated), i.e.
    ``2·L·Hkv·hd·ceil(T/B) / B`` per token. The exact indexer's selection scores are treated as
    selection overhead, not model FLOPs (as the issue specifies).

    Example: dense 7B shape (L=32, d=4096) at T=4096: 12·32·4096·4096 = 6.44e9 FLOPs/token;
    tiny (L=4, H=Hkv=4, hd=32, B=32) at T=256: 12·4·128·96 + 2·4·4·32·8/32 = 589,824 + 256.
    """
    d_attn = cfg.n_heads * cfg.head_dim
    flops = 12.0 * cfg.n_layers * d_attn * attended_keys(cfg, seq_len)
    if cfg.attention == "mla" and cfg.indexer == "block" and cfg.mix != "local":
        blocks = -(-seq_len // cfg.block_size)
        flops += 2.0 * cfg.n_layers * cfg.kv_heads * cfg.head_dim * blocks / cfg.block_size
    return flops


def training_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Model FLOPs per trained token: ``6N`` + attention (no recomputation counted).

    ``6N`` is Kaplan et al. 2020 (arXiv:2001.08361, §2.1) and PaLM App. B: 2 FLOPs per
    parameter per token forward, 4 backward. N is :func:`count_parameters`, which counts the tied
    embedding once: the lookup is free but the output head is a ``d x V`` matmul, so this equals
    Korthikanti et al. 2022's model FLOPs ``72·B·s·L·h²·(1 + s/6h + V/12hL)`` term for the
    logits (``6·V·h`` per token). The attention term is :func:`attention_flops_per_token`.

    Example (``tiny``, T=256, gated MLA, block selection): 6·838,800 + 589,824 + 256 =
    5,032,800 + 590,080 = **5,622,880** FLOPs/token.

    Args:
        cfg: Model shape.
        seq_len: Training sequence length T, in tokens.

    Raises:
        ValueError: ``seq_len`` < 1.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len={seq_len} must be >= 1")
    return 6.0 * count_parameters(cfg) + attention_flops_per_token(cfg, seq_len)
