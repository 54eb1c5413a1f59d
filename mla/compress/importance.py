"""Activation importance of prunable units, measured on calibration batches.

Minitron (Muralidharan et al. 2024, "Compact Language Models via Pruning and Knowledge
Distillation", Sec. 2.2, eqs. 1-2) scores each width unit by the mean magnitude of the
activation it produces over a small calibration set:

* MLP neuron i of layer l: ``F_i = mean_{b,t} |silu(w1 x)_i * (w3 x)_i|`` (the input of ``w2``);
* attention head h: ``F_h = mean_{b,t} ||o_h||_2``, the L2 norm of the head's output before
  ``wo``. Under grouped-query attention a key/value head and its query heads can only be
  removed together, so a group's score is the sum of its query heads' scores;
* hidden (embedding) channel i: Minitron Sec. 2.2, eq. 3 scores channel i by the outputs of the
  LayerNorms, ``F_emb(i) = sum_{B,S} LN(X)_i``. Here: the mean over calibration tokens of
  ``|RMSNorm(x)_i|`` (absolute value, as for the other units: a signed sum lets positive and
  negative activations cancel), summed over every RMSNorm of the model (``attn_norm`` and
  ``mlp_norm`` of each block and the final ``norm``: ``2L + 1`` norms), since the residual
  stream and so the kept channels are shared by all layers;
* layer l: Block Influence (ShortGPT, Men et al. 2024, arXiv:2403.03853, eq. 1),
  ``BI_l = 1 - mean_{b,t} cos(x_in, x_out)`` of the block's input and output hidden states
  ``(batch, seq, d_model)`` per token: a block that barely turns the residual stream matters
  little. BI is chosen over Minitron's depth metric (the loss increase when the block is
  removed) because one calibration pass scores every layer, where the loss metric needs one
  validation pass per layer; ``mla compress`` then ranks the layer sets it considers by that
  very loss (the masked validation loss of each candidate shape), so the loss criterion still
  decides between shapes.

Scores come from forward hooks on ``mlp.w2`` and ``attn.wo`` (their inputs), on every RMSNorm
(its output) and on every block (input and output), so no model code changes; the model runs
in eval mode under ``torch.no_grad``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from mla.decoding import blocks_of
from mla.model import MLATransformer


@dataclass(frozen=True)
class Importance:
    """Per-layer importance scores.

    Attributes:
        ffn: One ``(ffn_hidden,)`` float tensor per layer: mean |input of w2| per neuron.
        heads: One ``(n_heads,)`` tensor per layer: mean L2 norm of each head's output.
        groups: One ``(kv_heads,)`` tensor per layer: ``heads`` summed over each GQA group
            (query heads ``g*r .. (g+1)*r - 1`` read key/value head g, ``r = n_heads / kv_heads``).
        tokens: Calibration tokens seen.
        hidden: ``(d_model,)`` hidden-channel scores: mean |RMSNorm output| per channel summed
            over the ``2L + 1`` norms; ``None`` when not measured (scores built by hand).
        layers: ``(n_layers,)`` Block Influence of each block, ``1 - mean cos(x_in, x_out)``
            (in [0, 2]; higher = more important); ``None`` when not measured.
    """

    ffn: list[torch.Tensor]
    heads: list[torch.Tensor]
    groups: list[torch.Tensor]
    tokens: int
    hidden: torch.Tensor | None = None
    layers: torch.Tensor | None = None


@torch.no_grad()
def measure_importance(model: MLATransformer, batches: Iterable[torch.Tensor]) -> Importance:
    """Run ``model`` on calibration ``batches`` and return the activation importance of its units.

    Args:
        model: The model to score (left in eval mode).
        batches: ``(batch, seq)`` int64 token tensors.

    Returns:
        :class:`Importance` averaged over every calibration token.

    Raises:
        ValueError: ``batches`` is empty.
    """
    cfg = model.cfg
    n = len(model.blocks)
    ffn = [torch.zeros(cfg.ffn_hidden, dtype=torch.float64) for _ in range(n)]
    heads = [torch.zeros(cfg.n_heads, dtype=torch.float64) for _ in range(n)]
    hidden = torch.zeros(cfg.d_model, dtype=torch.float64)
    cos = torch.zeros(n, dtype=torch.float64)
    hooks = [model.norm.register_forward_hook(_norm_hook(hidden))]
    for i, block in enumerate(blocks_of(model)):
        hooks.append(block.mlp.w2.register_forward_pre_hook(_ffn_hook(ffn[i])))
        hooks.append(block.attn.wo.register_forward_pre_hook(_head_hook(heads[i], cfg.n_heads)))
        hooks.append(block.attn_norm.register_forward_hook(_norm_hook(hidden)))
        hooks.append(block.mlp_norm.register_forward_hook(_norm_hook(hidden)))
        hooks.append(block.register_forward_hook(_cos_hook(cos, i)))
    model.eval()
    tokens = 0
    try:
        for x in batches:
            model(x)
            tokens += x.numel()
    finally:
        for h in hooks:
            h.remove()
    if tokens == 0:
        raise ValueError("no calibration batches: importance needs at least one (batch, seq) batch")
    ffn = [(f / tokens).float() for f in ffn]
    heads = [(h / tokens).float() for h in heads]
    r = cfg.n_heads // cfg.kv_heads
    groups = [h.view(cfg.kv_heads, r).sum(-1) for h in heads]
    layers = (1.0 - cos / tokens).float()
    return Importance(ffn, heads, groups, tokens, (hidden / tokens).float(), layers)


def _ffn_hook(acc: torch.Tensor):
    def hook(_module, args):
        acc.add_(args[0].detach().abs().double().flatten(0, -2).sum(0))

    return hook


def _head_hook(acc: torch.Tensor, n_heads: int):
    def hook(_module, args):
        o = args[0].detach().double()
        acc.add_(o.unflatten(-1, (n_heads, -1)).norm(dim=-1).flatten(0, -2).sum(0))

    return hook


def _norm_hook(acc: torch.Tensor):
    def hook(_module, _args, out):
        acc.add_(out.detach().abs().double().flatten(0, -2).sum(0))

    return hook


def _cos_hook(acc: torch.Tensor, i: int):
    """Adds ``sum_{b,t} cos(x_in, x_out)`` of block ``i`` (ShortGPT eq. 1) to ``acc[i]``."""

    def hook(_module, args, out):
        x_in, x_out = args[0].detach().double(), out.detach().double()
        acc[i] += torch.nn.functional.cosine_similarity(x_in, x_out, dim=-1).sum()

    return hook
