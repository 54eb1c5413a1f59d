"""Structured pruning: keep the most important MLP neurons and GQA head groups per layer, hidden
(residual-stream) channels and whole layers, and remove the rest physically, giving an ordinary,
smaller :class:`mla.MLATransformer`.

The shape is uniform across layers (every kept layer keeps ``ffn_keep`` neurons and
``groups_keep`` key/value heads with all their query heads; every layer keeps the same
``hidden_keep`` channels, since the residual stream is shared), so the result is described by one
:class:`mla.config.ModelConfig`: ``ffn_hidden = ffn_keep``, ``n_kv_heads = groups_keep``,
``n_heads = groups_keep * r`` with ``r = n_heads / kv_heads`` the GQA ratio, ``d_model =
hidden_keep``, ``n_layers = layers_keep``, and ``attn_head_dim`` pinned to the original head
width whenever ``d_model // n_heads`` no longer gives it. Which units are kept is chosen from
:class:`mla.compress.importance.Importance` (Minitron, Muralidharan et al. 2024, Sec. 2.3: rank
by activation importance, trim the weight matrices; layers by Block Influence, ShortGPT, Men et
al. 2024, eq. 1: the ``layers_keep`` blocks of highest influence stay).

Slicing (rows are output features of ``nn.Linear``): ``w1``/``w3`` rows and ``w2`` columns of
the kept neurons; ``wq`` rows and ``wo`` columns of the kept query heads (``head_dim`` each);
``wk``/``wv`` rows of the kept key/value heads; ``w_gate`` rows and bias of the kept query
heads. Hidden channels S: the embedding's (and so the tied head's) columns S, every RMSNorm
weight's entries S, the input columns S of ``wq``/``wk``/``wv``/``w_gate``/``w1``/``w3`` and the
output rows S of ``wo``/``w2``. Removed layers are left out of ``blocks``.

RMSNorm over fewer channels: with the removed channels zero, the original norm divides the sum
of squares by d, the pruned one by d' = ``hidden_keep``. The pruned norms get the weights
``w_S * sqrt(d / d')`` and ``norm_eps * d / d'``, which makes them the same function exactly:
``x w / sqrt(m/d + eps) = x w sqrt(d/d') / sqrt(m/d' + eps d/d')`` with ``m`` the sum of squares
of the kept channels (Zhang & Sennrich 2019, eq. 4). The pruned model's logits equal the masked
original's up to float32 rounding (tested within 2e-5 absolute).

Constraints (:func:`shape_problems`): hidden channels are not split by tensor parallelism (the
residual stream and the norm weights are replicated on every tensor rank, Megatron-LM; only
the vocabulary, heads and MLP neurons are split), and the head width is explicit once
``attn_head_dim`` is set, so any ``1 <= hidden_keep <= d_model`` is a valid model; layers need
``1 <= layers_keep <= n_layers``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from mla.attention import MultiLevelAttention
from mla.compress.importance import Importance
from mla.config import ModelConfig
from mla.decoding import blocks_of
from mla.model import MLATransformer, SwiGLU


@dataclass(frozen=True)
class PrunePlan:
    """Which units the pruned model keeps.

    Attributes:
        ffn_keep: MLP neurons kept per layer.
        groups_keep: Key/value heads (GQA groups, each with its query heads) kept per layer.
        ffn_index: One sorted ``(ffn_keep,)`` int64 tensor of kept neuron ids per layer of the
            original model (entries of removed layers are unused).
        group_index: One sorted ``(groups_keep,)`` int64 tensor of kept key/value heads per
            layer of the original model.
        hidden_index: Sorted ``(hidden_keep,)`` int64 kept hidden channels, shared by every
            layer; ``None`` keeps all ``d_model``.
        layer_index: Sorted ``(layers_keep,)`` int64 kept blocks of the original model;
            ``None`` keeps all ``n_layers``.
    """

    ffn_keep: int
    groups_keep: int
    ffn_index: list[torch.Tensor]
    group_index: list[torch.Tensor]
    hidden_index: torch.Tensor | None = None
    layer_index: torch.Tensor | None = None

    @property
    def hidden_keep(self) -> int | None:
        """Hidden channels kept (``None``: all)."""
        return None if self.hidden_index is None else int(self.hidden_index.numel())

    @property
    def layers_keep(self) -> int | None:
        """Blocks kept (``None``: all)."""
        return None if self.layer_index is None else int(self.layer_index.numel())


def shape_problems(
    cfg: ModelConfig,
    ffn_keep: int,
    groups_keep: int,
    tp: int = 1,
    hidden_keep: int | None = None,
    layers_keep: int | None = None,
) -> list[str]:
    """Why pruning ``cfg`` to this shape is impossible (empty list when it is possible).

    Checks: at least one neuron, head group, hidden channel and layer survive; nothing grows;
    the pruned heads (``groups_keep * r`` query heads, ``groups_keep`` key/value heads) and MLP
    width stay divisible by the tensor-parallel degree ``tp`` (column-parallel ``wq``/``wk``/
    ``wv``/``w1``/``w3`` split heads and neurons across ranks,
    :mod:`workers.parallel.tensor_parallel`). ``hidden_keep`` has no divisibility constraint:
    the residual stream is replicated across tensor ranks and the head width is pinned
    (``attn_head_dim``), so ``d_model`` need not be a multiple of ``n_heads`` or ``tp``.

    Args:
        cfg: The unpruned model's configuration.
        ffn_keep: MLP neurons to keep per layer.
        groups_keep: Key/value head groups to keep per layer.
        tp: Tensor-parallel degree the pruned model must still support.
        hidden_keep: Hidden channels to keep (``None``: all).
        layers_keep: Blocks to keep (``None``: all).

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
    if hidden_keep is not None and not 1 <= hidden_keep <= cfg.d_model:
        out.append(
            f"hidden_keep={hidden_keep} must be in [1, d_model={cfg.d_model}] (pruning every "
            "hidden channel leaves no residual stream); keep between 1 and d_model channels"
        )
    if layers_keep is not None and not 1 <= layers_keep <= cfg.n_layers:
        out.append(
            f"layers_keep={layers_keep} must be in [1, n_layers={cfg.n_layers}] (pruning every "
            "layer leaves no transformer block); keep between 1 and n_layers blocks"
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
    importance: Importance,
    cfg: ModelConfig,
    ffn_keep: int,
    groups_keep: int,
    tp: int = 1,
    hidden_keep: int | None = None,
    layers_keep: int | None = None,
) -> PrunePlan:
    """Keep the ``ffn_keep`` most important neurons and ``groups_keep`` head groups of each
    layer, the ``hidden_keep`` most important hidden channels and the ``layers_keep`` blocks of
    highest Block Influence.

    Args:
        importance: Scores of the model to prune (:func:`measure_importance`).
        cfg: That model's configuration.
        ffn_keep: MLP neurons kept per layer.
        groups_keep: Key/value head groups kept per layer.
        tp: Tensor-parallel degree the result must support.
        hidden_keep: Hidden channels kept (``None`` or ``d_model``: all, no index).
        layers_keep: Blocks kept (``None`` or ``n_layers``: all, no index).

    Returns:
        The plan; indices sorted ascending so kept units keep their order.

    Raises:
        ValueError: the shape is impossible (:func:`shape_problems`), ``importance`` does not
            match ``cfg``, or it lacks the hidden/layer scores a hidden/layer pruning needs.
    """
    problems = shape_problems(cfg, ffn_keep, groups_keep, tp, hidden_keep, layers_keep)
    if problems:
        raise ValueError("cannot prune: " + "; ".join(problems))
    if len(importance.ffn) != cfg.n_layers or importance.ffn[0].numel() != cfg.ffn_hidden:
        raise ValueError("importance scores were measured on a model of another shape")
    hidden = None if hidden_keep in (None, cfg.d_model) else hidden_keep
    layers = None if layers_keep in (None, cfg.n_layers) else layers_keep
    if (hidden and importance.hidden is None) or (layers and importance.layers is None):
        raise ValueError(
            "hidden-channel / layer pruning needs Importance.hidden / .layers: measure the "
            "importance with mla.compress.importance.measure_importance"
        )
    return PrunePlan(
        ffn_keep,
        groups_keep,
        [_top(s, ffn_keep) for s in importance.ffn],
        [_top(s, groups_keep) for s in importance.groups],
        None if hidden is None else _top(importance.hidden, hidden),  # type: ignore[arg-type]
        None if layers is None else _top(importance.layers, layers),  # type: ignore[arg-type]
    )


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    return torch.topk(scores, k).indices.sort().values


def pruned_config(
    cfg: ModelConfig,
    ffn_keep: int,
    groups_keep: int,
    hidden_keep: int | None = None,
    layers_keep: int | None = None,
) -> ModelConfig:
    """The :class:`ModelConfig` of ``cfg`` pruned to ``ffn_keep`` neurons and ``groups_keep``
    head groups per layer, ``hidden_keep`` channels and ``layers_keep`` blocks (``None``: all).

    ``head_dim`` is kept: ``attn_head_dim`` is set whenever ``d_model // n_heads`` of the
    result would not give it. With fewer hidden channels d' < d, ``norm_eps`` becomes
    ``norm_eps * d / d'`` (the exact RMSNorm equivalence of the module docstring).

    Example: d 64, 8 heads of 8, kv 4, 2 layers -> ``pruned_config(cfg, 48, 2, 48, 1)``:
    d_model 48, n_heads 4, n_kv_heads 2, attn_head_dim 8, n_layers 1, norm_eps 1e-5 * 64 / 48.
    """
    r = cfg.n_heads // cfg.kv_heads
    heads = groups_keep * r
    d = cfg.d_model if hidden_keep is None else hidden_keep
    derived = d // heads if d % heads == 0 else None
    head_dim = None if derived == cfg.head_dim and cfg.attn_head_dim is None else cfg.head_dim
    return cfg.replace(
        ffn_hidden=ffn_keep,
        n_heads=heads,
        n_kv_heads=None if cfg.n_kv_heads is None else groups_keep,
        attn_head_dim=head_dim,
        d_model=d,
        n_layers=cfg.n_layers if layers_keep is None else layers_keep,
        norm_eps=cfg.norm_eps * cfg.d_model / d if d != cfg.d_model else cfg.norm_eps,
    )


def plan_config(cfg: ModelConfig, plan: PrunePlan) -> ModelConfig:
    """:func:`pruned_config` of the shape ``plan`` keeps."""
    return pruned_config(cfg, plan.ffn_keep, plan.groups_keep, plan.hidden_keep, plan.layers_keep)


def query_heads(group_index: torch.Tensor, ratio: int) -> torch.Tensor:
    """Query heads of the kept key/value heads: ``[g*r, ..., g*r + r - 1]`` for each g, in order."""
    return (group_index[:, None] * ratio + torch.arange(ratio)).flatten()


def kept_layers(cfg: ModelConfig, plan: PrunePlan) -> list[int]:
    """Original block ids the plan keeps, ascending."""
    return list(range(cfg.n_layers)) if plan.layer_index is None else plan.layer_index.tolist()


@torch.no_grad()
def apply_pruning(model: MLATransformer, plan: PrunePlan) -> MLATransformer:
    """A new, physically smaller model holding the kept units' weights (``model`` is unchanged).

    Args:
        model: The model the plan was made for.
        plan: Units to keep (:func:`plan_pruning`).

    Returns:
        An eval-mode :class:`MLATransformer` of :func:`plan_config`; with the removed units
        masked (:func:`masked`) the original computes the same logits.
    """
    cfg = model.cfg
    small = MLATransformer(plan_config(cfg, plan)).eval()
    s = torch.arange(cfg.d_model) if plan.hidden_index is None else plan.hidden_index
    scale = math.sqrt(cfg.d_model / s.numel())
    small.tok_emb.weight.copy_(model.tok_emb.weight[:, s])
    small.norm.weight.copy_(model.norm.weight[s] * scale)
    src_blocks = blocks_of(model)
    for i, dst in zip(kept_layers(cfg, plan), blocks_of(small), strict=True):
        src = src_blocks[i]
        dst.attn_norm.weight.copy_(src.attn_norm.weight[s] * scale)
        dst.mlp_norm.weight.copy_(src.mlp_norm.weight[s] * scale)
        _copy_mlp(src.mlp, dst.mlp, plan.ffn_index[i], s)
        _copy_attention(src.attn, dst.attn, plan.group_index[i], s, cfg)
    return small


def _copy_mlp(src: SwiGLU, dst: SwiGLU, f: torch.Tensor, s: torch.Tensor) -> None:
    dst.w1.weight.copy_(src.w1.weight[f][:, s])
    dst.w3.weight.copy_(src.w3.weight[f][:, s])
    dst.w2.weight.copy_(src.w2.weight[:, f][s])


def _copy_attention(
    src: MultiLevelAttention,
    dst: MultiLevelAttention,
    g: torch.Tensor,
    s: torch.Tensor,
    cfg: ModelConfig,
) -> None:
    r, hd = cfg.n_heads // cfg.kv_heads, cfg.head_dim
    q = query_heads(g, r)
    dst.wq.weight.copy_(_rows(src.wq.weight, q, hd)[:, s])
    dst.wk.weight.copy_(_rows(src.wk.weight, g, hd)[:, s])
    dst.wv.weight.copy_(_rows(src.wv.weight, g, hd)[:, s])
    dst.wo.weight.copy_(_rows(src.wo.weight.t(), q, hd).t()[s])
    if src.w_gate is not None and dst.w_gate is not None:
        dst.w_gate.weight.copy_(src.w_gate.weight[q][:, s])
        dst.w_gate.bias.copy_(src.w_gate.bias[q])


def _rows(weight: torch.Tensor, heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Rows of ``weight`` ``(heads_total * head_dim, in)`` belonging to ``heads``, in order."""
    return weight.unflatten(0, (-1, head_dim))[heads].flatten(0, 1)


@contextlib.contextmanager
def masked(model: MLATransformer, plan: PrunePlan) -> Iterator[MLATransformer]:
    """Within the block, ``model`` computes as if the units ``plan`` removes were zero.

    Zeroes the removed neurons at the input of ``w2`` and the removed query heads' outputs at
    the input of ``wo`` (forward pre-hooks); zeroes the removed hidden channels of the
    embedding's output and of every ``wo`` and ``w2`` output (forward hooks), so they stay zero
    all along the residual stream, every norm outputs zero there and every projection and the
    tied head read only the kept channels; removed blocks are taken out of ``model.blocks``
    for the duration (identity: the residual stream passes them unchanged). Since every masked
    quantity feeds a linear map, this is the function of the physically pruned model (whose
    norms are rescaled, :mod:`mla.compress.prune`); it also prices a plan without copying
    weights.
    """
    cfg = model.cfg
    r, hd = cfg.n_heads // cfg.kv_heads, cfg.head_dim
    hooks = []
    hidden = None if plan.hidden_index is None else _keep_mask(cfg.d_model, plan.hidden_index)
    if hidden is not None:
        hooks.append(model.tok_emb.register_forward_hook(_mask_out_hook(hidden)))
    all_blocks = model.blocks
    for i in kept_layers(cfg, plan):
        block = blocks_of(model)[i]
        ffn_mask = _keep_mask(cfg.ffn_hidden, plan.ffn_index[i])
        head_mask = _keep_mask(cfg.n_heads, query_heads(plan.group_index[i], r))
        hooks.append(block.mlp.w2.register_forward_pre_hook(_mask_hook(ffn_mask)))
        hooks.append(block.attn.wo.register_forward_pre_hook(_mask_hook(head_mask, hd)))
        if hidden is not None:
            hooks.append(block.mlp.w2.register_forward_hook(_mask_out_hook(hidden)))
            hooks.append(block.attn.wo.register_forward_hook(_mask_out_hook(hidden)))
    if plan.layer_index is not None:
        model.blocks = nn.ModuleList(all_blocks[i] for i in kept_layers(cfg, plan))
    try:
        yield model
    finally:
        model.blocks = all_blocks
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


def _mask_out_hook(mask: torch.Tensor):
    def hook(_module: nn.Module, _args: tuple[torch.Tensor, ...], out: torch.Tensor):
        return out * mask.to(out.dtype)

    return hook
