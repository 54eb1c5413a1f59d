"""Structured width pruning: keep the most important MLP neurons and GQA head groups per layer
and remove the rest physically, giving an ordinary, smaller :class:`mla.MLATransformer`.

The shape is uniform across layers (every layer keeps ``ffn_keep`` neurons and
``groups_keep`` key/value heads with all their query heads), so the result is described by one
:class:`mla.config.ModelConfig`: ``ffn_hidden = ffn_keep``, ``n_kv_heads = groups_keep``,
``n_heads = groups_keep * r`` with ``r = n_heads / kv_heads`` the GQA ratio, and
``attn_head_dim`` pinned to the original head width. Which units are kept is chosen per layer
from :class:`mla.compress.importance.Importance` (Minitron, Muralidharan et al. 2024, Sec. 2.3:
rank by activation importance, trim the weight matrices).

Slicing (rows are output features of ``nn.Linear``): ``w1``/``w3`` rows and ``w2`` columns of
the kept neurons; ``wq`` rows and ``wo`` columns of the kept query heads (``head_dim`` each);
``wk``/``wv`` rows of the kept key/value heads; ``w_gate`` rows and bias of the kept query
heads. Embedding, norms and the tied head are unchanged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from mla.compress.importance import Importance
from mla.config import ModelConfig
from mla.decoding import blocks_of
from mla.model import MLATransformer


@dataclass(frozen=True)
class PrunePlan:
    """Which units each layer keeps.

    Attributes:
        ffn_keep: MLP neurons kept per layer.
        groups_keep: Key/value heads (GQA groups, each with its query heads) kept per layer.
        ffn_index: One sorted ``(ffn_keep,)`` int64 tensor of kept neuron ids per layer.
        group_index: One sorted ``(groups_keep,)`` int64 tensor of kept key/value heads per layer.
    """

    ffn_keep: int
    groups_keep: int
    ffn_index: list[torch.Tensor]
    group_index: list[torch.Tensor]


def shape_problems(cfg: ModelConfig, ffn_keep: int, groups_keep: int, tp: int = 1) -> list[str]:
    """Why pruning ``cfg`` to this width is impossible (empty list when it is possible).

    Checks: at least one neuron and one head group survive; nothing grows; the pruned heads
    (``groups_keep * r`` query heads, ``groups_keep`` key/value heads) and MLP width stay
    divisible by the tensor-parallel degree ``tp`` (column-parallel ``wq``/``wk``/``wv``/``w1``/
    ``w3`` split heads and neurons across ranks, :mod:`workers.parallel.tensor_parallel`).

    Args:
        cfg: The unpruned model's configuration.
        ffn_keep: MLP neurons to keep per layer.
        groups_keep: Key/value head groups to keep per layer.
        tp: Tensor-parallel degree the pruned model must still support.

    Returns:
        Messages naming the field, the value and the allowed range.
    """
    out: list[str] = []
    r = cfg.n_heads // cfg.kv_heads
    if not 1 <= ffn_keep <= cfg.ffn_hidden:
        out.append(
            f"ffn_keep={ffn_keep} must be in [1, ffn_hidden={cfg.ffn_hidden}] "
            "(pruning every MLP neuron leaves no MLP)"
        )
    if not 1 <= groups_keep <= cfg.kv_heads:
        out.append(
            f"groups_keep={groups_keep} must be in [1, kv_heads={cfg.kv_heads}] (one group = one "
            f"key/value head and its {r} query heads; pruning every head leaves no attention)"
        )
    if tp < 1:
        out.append(f"tp={tp} must be >= 1")
    if out:
        return out
    if groups_keep % tp:
        out.append(
            f"groups_keep={groups_keep} is not divisible by tp({tp}): the pruned model's "
            f"n_kv_heads({groups_keep}) and n_heads({groups_keep * r}) must split across tp ranks; "
            f"keep a multiple of {tp} groups"
        )
    if ffn_keep % tp:
        out.append(
            f"ffn_keep={ffn_keep} is not divisible by tp({tp}): ffn_hidden splits across tp "
            f"ranks; keep a multiple of {tp} neurons"
        )
    return out


def plan_pruning(
    importance: Importance, cfg: ModelConfig, ffn_keep: int, groups_keep: int, tp: int = 1
) -> PrunePlan:
    """Keep the ``ffn_keep`` most important neurons and ``groups_keep`` head groups of each layer.

    Args:
        importance: Scores of the model to prune (:func:`measure_importance`).
        cfg: That model's configuration.
        ffn_keep: MLP neurons kept per layer.
        groups_keep: Key/value head groups kept per layer.
        tp: Tensor-parallel degree the result must support.

    Returns:
        The plan; indices sorted ascending so kept units keep their order.

    Raises:
        ValueError: the shape is impossible (:func:`shape_problems`), or ``importance`` does
            not match ``cfg``.
    """
    problems = shape_problems(cfg, ffn_keep, groups_keep, tp)
    if problems:
        raise ValueError("cannot prune: " + "; ".join(problems))
    if len(importance.ffn) != cfg.n_layers or importance.ffn[0].numel() != cfg.ffn_hidden:
        raise ValueError("importance scores were measured on a model of another shape")
    return PrunePlan(
        ffn_keep,
        groups_keep,
        [_top(s, ffn_keep) for s in importance.ffn],
        [_top(s, groups_keep) for s in importance.groups],
    )


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    return torch.topk(scores, k).indices.sort().values


def pruned_config(cfg: ModelConfig, ffn_keep: int, groups_keep: int) -> ModelConfig:
    """The :class:`ModelConfig` of ``cfg`` pruned to ``ffn_keep`` neurons and ``groups_keep``
    head groups per layer (``head_dim`` kept; ``attn_head_dim`` set when heads go)."""
    r = cfg.n_heads // cfg.kv_heads
    heads = groups_keep * r
    head_dim = cfg.head_dim if heads != cfg.n_heads or cfg.attn_head_dim else None
    return cfg.replace(
        ffn_hidden=ffn_keep,
        n_heads=heads,
        n_kv_heads=None if cfg.n_kv_heads is None else groups_keep,
        attn_head_dim=head_dim,
    )


def query_heads(group_index: torch.Tensor, ratio: int) -> torch.Tensor:
    """Query heads of the kept key/value heads: ``[g*r, ..., g*r + r - 1]`` for each g, in order."""
    return (group_index[:, None] * ratio + torch.arange(ratio)).flatten()


@torch.no_grad()
def apply_pruning(model: MLATransformer, plan: PrunePlan) -> MLATransformer:
    """A new, physically smaller model holding the kept units' weights (``model`` is unchanged).

    Args:
        model: The model the plan was made for.
        plan: Units to keep (:func:`plan_pruning`).

    Returns:
        An eval-mode :class:`MLATransformer` of :func:`pruned_config`; with the removed units'
        outputs masked to zero (:func:`masked`) the original computes the same logits.
    """
    cfg = model.cfg
    small = MLATransformer(pruned_config(cfg, plan.ffn_keep, plan.groups_keep)).eval()
    small.tok_emb.weight.copy_(model.tok_emb.weight)
    small.norm.weight.copy_(model.norm.weight)
    r, hd = cfg.n_heads // cfg.kv_heads, cfg.head_dim
    for i, (src, dst) in enumerate(zip(blocks_of(model), blocks_of(small), strict=True)):
        dst.attn_norm.weight.copy_(src.attn_norm.weight)
        dst.mlp_norm.weight.copy_(src.mlp_norm.weight)
        f = plan.ffn_index[i]
        dst.mlp.w1.weight.copy_(src.mlp.w1.weight[f])
        dst.mlp.w3.weight.copy_(src.mlp.w3.weight[f])
        dst.mlp.w2.weight.copy_(src.mlp.w2.weight[:, f])
        g = plan.group_index[i]
        q = query_heads(g, r)
        dst.attn.wq.weight.copy_(_rows(src.attn.wq.weight, q, hd))
        dst.attn.wk.weight.copy_(_rows(src.attn.wk.weight, g, hd))
        dst.attn.wv.weight.copy_(_rows(src.attn.wv.weight, g, hd))
        dst.attn.wo.weight.copy_(_rows(src.attn.wo.weight.t(), q, hd).t())
        if src.attn.w_gate is not None and dst.attn.w_gate is not None:
            dst.attn.w_gate.weight.copy_(src.attn.w_gate.weight[q])
            dst.attn.w_gate.bias.copy_(src.attn.w_gate.bias[q])
    return small


def _rows(weight: torch.Tensor, heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Rows of ``weight`` ``(heads_total * head_dim, in)`` belonging to ``heads``, in order."""
    return weight.unflatten(0, (-1, head_dim))[heads].flatten(0, 1)


@contextlib.contextmanager
def masked(model: MLATransformer, plan: PrunePlan) -> Iterator[MLATransformer]:
    """Within the block, ``model`` computes as if the units ``plan`` removes were zero.

    Zeroes the removed neurons at the input of ``w2`` and the removed query heads' outputs at
    the input of ``wo`` (forward pre-hooks). Since both feed a linear map, this is the same
    function as the physically pruned model; it also prices a plan without copying weights.
    """
    cfg = model.cfg
    r, hd = cfg.n_heads // cfg.kv_heads, cfg.head_dim
    hooks = []
    for i, block in enumerate(blocks_of(model)):
        ffn_mask = _keep_mask(cfg.ffn_hidden, plan.ffn_index[i])
        head_mask = _keep_mask(cfg.n_heads, query_heads(plan.group_index[i], r))
        hooks.append(block.mlp.w2.register_forward_pre_hook(_mask_hook(ffn_mask)))
        hooks.append(block.attn.wo.register_forward_pre_hook(_mask_hook(head_mask, hd)))
    try:
        yield model
    finally:
        for h in hooks:
            h.remove()


def _keep_mask(n: int, keep: torch.Tensor) -> torch.Tensor:
    mask = torch.zeros(n)
    mask[keep] = 1.0
    return mask


def _mask_hook(mask: torch.Tensor, repeat: int = 1):
    full = mask.repeat_interleave(repeat)

    def hook(_module: nn.Module, args: tuple[torch.Tensor, ...]):
        return (args[0] * full.to(args[0].dtype),)

    return hook
