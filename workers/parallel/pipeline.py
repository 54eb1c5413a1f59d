"""The MLA transformer as DeepSpeed layer specs: a ``PipelineModule`` when ``pp > 1``.

Layers, in order (each a small ``nn.Module`` with a ``canonical_prefix`` that names its
parameters as in :class:`mla.model.MLATransformer`, whatever the layout):

    EmbeddingLayer (tied, key "embed")  tok_emb.*      vocab-parallel embedding (padded rows)
    BlockLayer 0 .. L-1                 blocks.{i}.*   tensor-parallel TransformerBlock
    NormLayer                           norm.*         final RMSNorm
    EmbeddingLayer (tied, key "embed")  (head)         tied output head: this rank's logit shard

With ``pp > 1`` DeepSpeed builds only the specs of its own stage (``partition_method=
"type:BlockLayer"`` balances the blocks; the embedding lands on the first stage, norm and head
on the last), and the ``TiedLayerSpec`` makes first and last stage hold the same embedding
weight: DeepSpeed broadcasts it at start and all-reduces its gradient over the two stages.
With ``pp == 1`` the same layers run in :class:`SequentialLM`.

Initialisation is per layer and independent of the layout, so every layout starts from the
same full weights: the embedding from generator seed ``seed``, block ``i`` from
``layer_seed(seed, i)``; each layer draws its *full* weights (N(0, 0.02^2), residual
projections N(0, (0.02/sqrt(2L))^2), GPT-2, Radford et al. 2019, Sec. 2.3) and then keeps its
tensor-parallel shard. (The streams differ from :class:`mla.model.MLATransformer`'s single
stream, the distributions do not.)
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from mla.config import ModelConfig
from mla.model import INIT_STD, RMSNorm, TransformerBlock, init_gpt2_weights
from orchestrator.contract.layout import Layout, padded_vocab_size
from workers.parallel.groups import ParallelGroups, topology
from workers.parallel.tensor_parallel import (
    VocabParallelEmbedding,
    apply_tensor_parallel,
    vocab_parallel_cross_entropy,
)

TIED_KEY = "embed"


def layer_seed(seed: int, index: int) -> int:
    """Seed of block ``index``'s initialisation (the embedding uses ``seed`` itself)."""
    return seed * 1_000_003 + 1 + index


class EmbeddingLayer(VocabParallelEmbedding):
    """First layer (token ids -> embeddings) and, tied, the output head (``logits``)."""

    canonical_prefix = "tok_emb."

    def __init__(self, cfg: ModelConfig, seed: int, tp_rank: int, tp: int, group):
        full = nn.Embedding(cfg.vocab_size, cfg.d_model)
        with torch.no_grad():
            full.weight.normal_(0.0, INIT_STD, generator=torch.Generator().manual_seed(seed))
        super().__init__(full, tp_rank, tp, group)


class BlockLayer(TransformerBlock):
    """Block ``layer_idx`` of the MLA transformer, tensor-parallel, with optional recomputation.

    Args:
        cfg: Model configuration.
        layer_idx: Block index (0-based), also its place in canonical names.
        seed: Run seed (see :func:`layer_seed`).
        tp_rank, tp, group: Tensor-parallel coordinates.
        recompute: ``"none"``; ``"selective"`` recomputes the attention (its score tensors are
            the largest activations) in the backward pass; ``"full"`` the whole block. Both use
            DeepSpeed activation checkpointing (``deepspeed.checkpointing.checkpoint``).
    """

    def __init__(
        self,
        cfg: ModelConfig,
        layer_idx: int,
        seed: int,
        tp_rank: int,
        tp: int,
        group,
        recompute: str = "none",
    ):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(layer_seed(seed, layer_idx))
            super().__init__(cfg, layer_idx)
            init_gpt2_weights(self, cfg.n_layers)
        apply_tensor_parallel(self, tp_rank, tp, group)
        self.canonical_prefix = f"blocks.{layer_idx}."
        self.recompute = recompute

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``(batch, seq, d_model)`` -> same shape (the block's own forward)."""
        if not self._recomputes("full"):
            return super().forward(x)
        from deepspeed.runtime.activation_checkpointing.checkpointing import checkpoint

        return checkpoint(super().forward, x)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """The attention sub-layer, recomputed in the backward pass under ``"selective"``."""
        if not self._recomputes("selective"):
            return self.attn(x)
        from deepspeed.runtime.activation_checkpointing.checkpointing import checkpoint

        return checkpoint(self.attn, x)

    def _recomputes(self, mode: str) -> bool:
        return self.recompute == mode and self.training and torch.is_grad_enabled()


class NormLayer(RMSNorm):
    """The final RMSNorm."""

    canonical_prefix = "norm."


def head_forward(embedding: EmbeddingLayer, x: torch.Tensor) -> torch.Tensor:
    """The tied head: ``(batch, seq, d_model)`` -> ``(batch, seq, vocab / tp)`` logit shard."""
    return embedding.logits(x)


class VocabParallelLoss:
    """``loss_fn(logits_shard, targets)``: mean token cross-entropy (all tensor ranks agree)."""

    def __init__(self, groups: ParallelGroups, vocab_size: int):
        per_rank = padded_vocab_size(vocab_size, groups.layout.tp) // groups.layout.tp
        self.groups, self.vocab_start = groups, groups.tp_rank * per_rank

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return vocab_parallel_cross_entropy(
            logits, targets, self.vocab_start, self.groups.tp_group, self.groups.layout.tp
        )


def layer_specs(cfg: ModelConfig, groups: ParallelGroups, seed: int, recompute: str) -> list:
    """DeepSpeed ``LayerSpec``s of the whole model (nothing is built yet)."""
    from deepspeed.pipe import LayerSpec, TiedLayerSpec

    tp = (groups.tp_rank, groups.layout.tp, groups.tp_group)
    return [
        TiedLayerSpec(TIED_KEY, EmbeddingLayer, cfg, seed, *tp),
        *[
            LayerSpec(BlockLayer, cfg, i, seed, *tp, recompute=recompute)
            for i in range(cfg.n_layers)
        ],
        LayerSpec(NormLayer, cfg.d_model, cfg.norm_eps),
        TiedLayerSpec(TIED_KEY, EmbeddingLayer, cfg, seed, *tp, forward_fn=head_forward),
    ]


class SequentialLM(nn.Module):
    """The layers of :func:`layer_specs` in one process (``pp == 1``); ``forward`` returns the loss.

    Args:
        layers: ``[EmbeddingLayer, BlockLayer * L, NormLayer]`` (the head reuses the embedding).
        loss_fn: ``(logits_shard, targets) -> scalar``.
    """

    def __init__(self, layers: list[nn.Module], loss_fn):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.loss_fn = loss_fn

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """``inputs``, ``targets``: ``(batch, seq)`` int64 -> mean token loss (scalar)."""
        x = inputs
        for layer in self.layers:
            x = layer(x)
        return self.loss_fn(head_forward(self.layers[0], x), targets)


def build_pipeline(
    cfg: ModelConfig, layout: Layout, groups: ParallelGroups, seed: int, wrap_loss=None
) -> nn.Module:
    """This rank's part of the model: a ``PipelineModule`` (``pp > 1``) or a :class:`SequentialLM`.

    ``wrap_loss``, when given, turns the ordinary loss function into the run's
    (``train.distill``: :class:`workers.distill.DistillLoss`).

    Raises:
        LayoutError: (a ``ValueError``) the layout cannot split this model (tp vs heads, pp vs
            layers).
    """
    layout.check_model(cfg.n_heads, cfg.kv_heads, cfg.n_layers)
    specs = layer_specs(cfg, groups, seed, layout.recompute)
    loss_fn = VocabParallelLoss(groups, cfg.vocab_size)
    if wrap_loss is not None:
        loss_fn = wrap_loss(loss_fn)
    if layout.pp == 1:
        return SequentialLM([spec.build() for spec in specs[:-1]], loss_fn)
    return build_pipeline_module(
        layers=specs,
        loss_fn=loss_fn,
        topology=topology(layout),
        partition_method="type:BlockLayer",
        activation_checkpoint_interval=0,
    )


def build_pipeline_module(**kwargs) -> nn.Module:
    """DeepSpeed's ``PipelineModule(**kwargs)`` whose tied-weight gradient all-reduce skips a
    frozen tied weight (``train.freeze``): DeepSpeed 0.19 all-reduces ``weight.grad`` of every
    tied weight unconditionally, and a frozen one has no gradient (``None``)."""
    from deepspeed.pipe import PipelineModule

    class FreezablePipelineModule(PipelineModule):
        def allreduce_tied_weight_gradients(self) -> None:
            for key, comm in self.tied_comms.items():
                for attr_name in comm["weight_attr"]:
                    weight = self._recursive_getattr(self.tied_modules[key], attr_name)
                    if weight.requires_grad and weight.grad is not None:
                        dist.all_reduce(weight.grad, group=comm["group"])

    return FreezablePipelineModule(**kwargs)


def apply_freeze(model: nn.Module, frozen: frozenset[str]) -> int:
    """Set ``requires_grad = False`` on this rank's parameters whose canonical names are in
    ``frozen`` (:func:`mla.freeze.frozen_parameters`), before the optimizer is built, so that they
    get no gradient, no optimizer state and no gradient all-reduce. Returns how many this rank
    froze."""
    count = 0
    for name, p in canonical_parameters(model).items():
        if name in frozen:
            p.requires_grad_(False)
            count += 1
    return count


def stage_prefixes(n_layers: int, pp: int) -> list[list[str]]:
    """The canonical name prefixes each pipeline stage holds, as DeepSpeed partitions
    :func:`layer_specs` (``partition_method="type:BlockLayer"``: blocks balanced over stages,
    the embedding on the first, norm and tied head on the last).

    Example: ``stage_prefixes(4, 2)`` ->
    ``[["tok_emb.", "blocks.0.", "blocks.1."], ["blocks.2.", "blocks.3.", "norm.", "tok_emb."]]``.
    """
    from deepspeed.runtime.utils import partition_balanced

    names = ["tok_emb.", *[f"blocks.{i}." for i in range(n_layers)], "norm.", "tok_emb."]
    parts = partition_balanced([0, *[1] * n_layers, 0, 0], pp)
    return [names[parts[s] : parts[s + 1]] for s in range(pp)]


def vocab_rows(model: nn.Module) -> dict[str, int]:
    """Canonical names of this rank's vocabulary-padded parameters -> their real rows.

    The embedding holds ``padded_vocab_size(V, tp)`` rows across the tensor group; checkpoints
    keep the first ``V`` (the padding is zeros and never trained), so a checkpoint is the same
    whatever the tensor-parallel degree. Example: ``{"tok_emb.weight": 257}``.
    """
    return {
        m.canonical_prefix + "weight": m.vocab_size
        for m in model.modules()
        if isinstance(m, EmbeddingLayer)
    }


def canonical_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """This rank's parameters under their :class:`mla.model.MLATransformer` names (shards for
    split ones), e.g. ``blocks.3.attn.wq.weight``; a tied weight appears once."""
    out: dict[str, nn.Parameter] = {}
    for module in model.modules():
        prefix = getattr(module, "canonical_prefix", None)
        if prefix is None:
            continue
        for name, p in module.named_parameters():
            out.setdefault(prefix + name, p)
    return out
