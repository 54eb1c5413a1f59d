"""Model configuration for the MLA (Dynamic Multi-Level Attention) transformer.

This module is pure Python (no torch import) so that the planner and the CLI can read model
shapes without loading PyTorch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

AttentionKind = Literal["mla", "dense"]
MixKind = Literal["gate", "sum", "local"]
IndexerKind = Literal["exact", "block"]


@dataclass(frozen=True)
class ModelConfig:
    """Shape and attention settings of an :class:`mla.MLATransformer`.

    Attributes:
        vocab_size: Number of token ids (256 for the byte-level tokenizer).
        d_model: Hidden size (model width), in features.
        n_layers: Number of transformer blocks.
        n_heads: Number of attention (query) heads; ``d_model`` must be divisible by it.
        n_kv_heads: Number of key/value heads (grouped-query attention); divides ``n_heads``.
            ``None`` means ``n_heads`` (multi-head attention).
        ffn_hidden: Width of the SwiGLU MLP's hidden layer, in features.
        max_seq_len: Longest sequence the rotary embedding is precomputed for, in tokens.
        attention: ``"mla"`` (local sliding window + sparse global top-k, mixed by a gate) or
            ``"dense"`` (plain causal softmax attention, the baseline).
        local_window: Sliding-window size w of the local branch: query i sees keys
            ``i - w < j <= i``, in tokens.
        global_k: Budget of the sparse global branch, in tokens. With ``indexer="block"`` it is
            rounded up to ``n_sel = ceil(global_k / block_size)`` whole earlier key blocks, so
            each query attends to up to ``(n_sel + 1) * block_size`` keys (the selected blocks
            plus the causal part of its own block; :mod:`mla.block_selection`). With
            ``indexer="exact"`` it is the number of keys k per query (token top-k).
        mix: ``"gate"`` mixes the branches per head with a learned sigmoid gate computed from
            the input; ``"sum"`` adds the two branch outputs; ``"local"`` keeps the local branch
            alone (window-only attention: the global branch switched off, no gate parameters),
            the ablation that shows what the global branch adds.
        indexer: How the global branch selects its keys: ``"block"`` (the model's fast path)
            selects whole key blocks per query block from causal mean-pooled queries and keys,
            one choice per key/value head shared by its GQA group (Native Sparse Attention's
            selection branch); ``"exact"`` (reference option, O(n^2) scoring) keeps the exact
            token-level top-k causal keys of each query.
        block_size: Block size B of the block selection (query and key blocks) and of the
            blocked local branch, in tokens. 128 is the block size of the FlexAttention path on
            CUDA (:mod:`mla.flex_attention`). Measured guidance: prefer ``block_size <
            local_window`` and at least two selected blocks; with one block of ``B = w`` the
            global branch's own block repeats the window, and a small LM at context 1024 lost
            3.6% of validation loss to dense against 0.4% with two blocks of ``w / 2`` (same 64
            earlier keys; README, "Measured so far").
        rope_theta: Base of the rotary position embedding (RoFormer, Su et al. 2021, eq. 15).
        norm_eps: Epsilon of RMSNorm.
        dropout: Dropout probability on attention output and MLP output (0 disables it).
    """

    vocab_size: int = 256
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None
    ffn_hidden: int = 352
    max_seq_len: int = 256
    attention: AttentionKind = "mla"
    local_window: int = 32
    global_k: int = 8
    mix: MixKind = "gate"
    indexer: IndexerKind = "block"
    block_size: int = 64
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    dropout: float = 0.0

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise ValueError("invalid ModelConfig: " + "; ".join(problems))

    def problems(self) -> list[str]:
        """Return human-readable reasons why this config is invalid (empty when valid)."""
        out: list[str] = []
        for name in (
            "vocab_size",
            "d_model",
            "n_layers",
            "n_heads",
            "ffn_hidden",
            "max_seq_len",
            "local_window",
            "global_k",
            "block_size",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                out.append(f"{name}={value!r} must be a positive integer")
        if out:
            return out
        if self.d_model % self.n_heads:
            out.append(
                f"d_model({self.d_model}) is not divisible by n_heads({self.n_heads}); "
                f"choose n_heads among {_divisors(self.d_model)}"
            )
        kv = self.kv_heads
        if kv < 1 or self.n_heads % kv:
            out.append(f"n_kv_heads({self.n_kv_heads}) must divide n_heads({self.n_heads})")
        if self.attention not in ("mla", "dense"):
            out.append(f"attention={self.attention!r} must be 'mla' or 'dense'")
        if self.mix not in ("gate", "sum", "local"):
            out.append(f"mix={self.mix!r} must be 'gate', 'sum' or 'local'")
        if self.indexer not in ("exact", "block"):
            out.append(f"indexer={self.indexer!r} must be 'exact' or 'block'")
        if not 0.0 <= self.dropout < 1.0:
            out.append(f"dropout={self.dropout} must be in [0, 1)")
        return out

    @property
    def head_dim(self) -> int:
        """Features per attention head, ``d_model // n_heads``."""
        return self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        """Number of key/value heads (``n_kv_heads`` or ``n_heads``)."""
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    def replace(self, **changes: object) -> ModelConfig:
        """Return a copy with ``changes`` applied (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """Plain-dict form (JSON/YAML friendly)."""
        return dataclasses.asdict(self)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _swiglu_hidden(d_model: int, multiple_of: int = 256) -> int:
    """SwiGLU width rule of LLaMA (Touvron et al. 2023): 2/3 * 4d rounded up to a multiple."""
    hidden = int(2 * 4 * d_model / 3)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


#: Named model shapes, from the 1M-parameter smoke-test model to a 70B-class model (LLaMA-2 70B
#: dimensions, Touvron et al. 2023, Table 1, with MLA attention instead of dense).
PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(
        vocab_size=256,
        d_model=128,
        n_layers=4,
        n_heads=4,
        ffn_hidden=352,
        max_seq_len=256,
        local_window=32,
        global_k=8,
        block_size=32,
    ),
    "small": ModelConfig(
        vocab_size=32000,
        d_model=768,
        n_layers=12,
        n_heads=12,
        ffn_hidden=_swiglu_hidden(768),
        max_seq_len=2048,
        local_window=256,
        global_k=64,
        block_size=128,
    ),
    "1b": ModelConfig(
        vocab_size=32000,
        d_model=2048,
        n_layers=22,
        n_heads=32,
        n_kv_heads=4,
        ffn_hidden=5632,
        max_seq_len=4096,
        local_window=512,
        global_k=128,
        block_size=128,
    ),
    "7b": ModelConfig(
        vocab_size=32000,
        d_model=4096,
        n_layers=32,
        n_heads=32,
        ffn_hidden=11008,
        max_seq_len=4096,
        local_window=1024,
        global_k=256,
        block_size=128,
    ),
    "13b": ModelConfig(
        vocab_size=32000,
        d_model=5120,
        n_layers=40,
        n_heads=40,
        ffn_hidden=13824,
        max_seq_len=4096,
        local_window=1024,
        global_k=256,
        block_size=128,
    ),
    "70b": ModelConfig(
        vocab_size=32000,
        d_model=8192,
        n_layers=80,
        n_heads=64,
        n_kv_heads=8,
        ffn_hidden=28672,
        max_seq_len=4096,
        local_window=1024,
        global_k=256,
        block_size=128,
    ),
}


def get_preset(name: str) -> ModelConfig:
    """Return the preset called ``name``.

    Raises:
        KeyError: ``name`` is not a preset; the message lists the known names.
    """
    try:
        return PRESETS[name]
    except KeyError:
        raise KeyError(
            f"unknown model preset {name!r}; known presets: {', '.join(PRESETS)}"
        ) from None
