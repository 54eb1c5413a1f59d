"""Decoder-only language model with multi-level (or dense) attention.

Pre-norm transformer (GPT-2 / LLaMA layout): ``x + attn(norm(x))`` then ``x + mlp(norm(x))``,
RMSNorm (Zhang & Sennrich 2019), SwiGLU MLP (Shazeer 2020), rotary positions inside attention
(RoFormer), output head tied to the token embedding (Press & Wolf 2017).

Parameter count (checked by the tests):
``V*d + L*(2d + d*H*hd + 2*d*kv*hd + H*hd*d + [d*H + H if mla+gate] + 3*d*ffn) + d``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from mla.attention import MultiLevelAttention
from mla.config import ModelConfig

#: Standard deviation of the normal initialisation (GPT-2, Radford et al. 2019).
INIT_STD = 0.02


class RMSNorm(nn.Module):
    """Root-mean-square layer norm (Zhang & Sennrich 2019, eq. 4): ``x / rms(x) * weight``.

    Args:
        dim: Feature size d; one weight vector of size d, no bias.
        eps: Added to the mean square before the square root.
    """

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``(..., dim)`` -> same shape (normalised in float32, cast back)."""
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.to(x.dtype) * self.weight


class SwiGLU(nn.Module):
    """SwiGLU MLP (Shazeer 2020, eq. 6 with Swish_1 = SiLU): ``w2(silu(w1 x) * w3 x)``.

    Args:
        d_model: Input/output width d.
        hidden: Hidden width ffn; ``w1`` (gate) and ``w3`` (up) are d -> ffn, ``w2`` (down)
            ffn -> d, all without bias.
    """

    def __init__(self, d_model: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(d_model, hidden, bias=False)
        self.w3 = nn.Linear(d_model, hidden, bias=False)
        self.w2 = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``(..., d_model)`` -> same shape."""
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    """One pre-norm block: ``h = x + attn(attn_norm(x)); out = h + mlp(mlp_norm(h))``.

    Usable alone (pipeline stages call ``block(x)``): the rotary cache lives inside ``attn``.
    Subclasses that recompute the attention in the backward pass override
    :meth:`attention` alone (``workers.parallel.pipeline.BlockLayer``), so the block's forward
    is written once.

    Args:
        cfg: Model configuration.
        layer_idx: Position of the block in the stack (0-based); scales nothing by itself.
    """

    def __init__(self, cfg: ModelConfig, layer_idx: int = 0) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = MultiLevelAttention(cfg, layer_idx)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = SwiGLU(cfg.d_model, cfg.ffn_hidden)
        self.mlp_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``(batch, seq, d_model)`` -> same shape."""
        h = x + self.attention(self.attn_norm(x))
        return h + self.mlp_dropout(self.mlp(self.mlp_norm(h)))

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """The attention sub-layer on normalised input: ``(batch, seq, d_model)`` -> same shape."""
        return self.attn(x)


class MLATransformer(nn.Module):
    """Decoder-only LM: ``tok_emb`` -> ``blocks`` -> ``norm`` -> head tied to ``tok_emb``.

    Args:
        cfg: Model configuration.
        recompute: Run each block under ``torch.utils.checkpoint`` while training (activation
            recomputation: block activations are recomputed in the backward pass). Can also be
            switched later through the ``recompute`` attribute.

    Initialisation (deterministic under ``torch.manual_seed``): every Linear and Embedding
    weight ~ N(0, 0.02^2); ``wo`` and ``w2`` ~ N(0, (0.02 / sqrt(2 L))^2) (GPT-2's scaled
    residual init, Radford et al. 2019, Sec. 2.3); gate bias 0 (g = 0.5 at start); norms 1.
    """

    def __init__(self, cfg: ModelConfig, recompute: bool = False) -> None:
        super().__init__()
        self.cfg = cfg
        self.recompute = recompute
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(TransformerBlock(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        init_gpt2_weights(self, cfg.n_layers)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Next-token logits.

        Args:
            tokens: ``(batch, seq)`` int64 token ids, ``seq <= cfg.max_seq_len``.

        Returns:
            ``(batch, seq, vocab_size)`` logits (position t predicts token t + 1).
        """
        x = self.tok_emb(tokens)
        for block in self.blocks:
            if self.recompute and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return self.head(self.norm(x))

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """Tied output projection: ``(..., d_model)`` -> ``(..., vocab_size)`` with ``tok_emb.weight``."""
        return F.linear(x, self.tok_emb.weight)


def init_gpt2_weights(module: nn.Module, n_layers: int) -> None:
    """GPT-2 initialisation of a model or of one block, in place (Radford et al. 2019, Sec. 2.3).

    Every Linear and Embedding weight ~ N(0, 0.02^2) and every bias 0, in module order; then the
    residual projections of every :class:`TransformerBlock` inside ``module`` (``attn.wo``,
    ``mlp.w2``) ~ N(0, (0.02 / sqrt(2 * n_layers))^2). Norm weights keep their 1. The one
    initialisation of :class:`MLATransformer` and of each pipeline stage's blocks
    (``workers.parallel.pipeline.BlockLayer``).

    Args:
        module: An :class:`MLATransformer`, a :class:`TransformerBlock` or anything holding them.
        n_layers: Blocks L of the whole model (not of ``module``): the residual scale's L.
    """
    module.apply(_init_weights)
    for block in module.modules():
        if isinstance(block, TransformerBlock):
            init_residual_projections(block, n_layers)


def _init_weights(module: nn.Module) -> None:
    """Normal(0, 0.02) for Linear/Embedding weights, zero biases."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=INIT_STD)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)


def init_residual_projections(block: TransformerBlock, n_layers: int) -> None:
    """GPT-2 scaled init of the projections into the residual stream (``attn.wo``, ``mlp.w2``):
    std ``0.02 / sqrt(2 * n_layers)`` (Radford et al. 2019, Sec. 2.3)."""
    std = INIT_STD / math.sqrt(2 * n_layers)
    nn.init.normal_(block.attn.wo.weight, mean=0.0, std=std)
    nn.init.normal_(block.mlp.w2.weight, mean=0.0, std=std)
