"""Which parameters a fine-tune trains: name patterns and "only the last N blocks" (PEFT-style).

Names are those of :class:`mla.model.MLATransformer` (``tok_emb.weight``,
``blocks.3.attn.wq.weight``, ``norm.weight``), whatever the parallel layout: the workers map
their tensor shards and pipeline stages onto these names
(:func:`workers.parallel.pipeline.canonical_parameters`), so a pattern means the same parameter
under every layout.

The output head is tied to the token embedding (``tok_emb.weight``, one tensor), so "train the
head" trains the embedding too and a frozen head freezes it: there is no separate head weight to
train on its own. The head here is the final RMSNorm (``norm.weight``) plus that tied weight.

Pure Python: no torch import, so the driver validates a job without loading the model library's
tensor code (:func:`parameter_shapes` imports torch when called).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Mapping

#: The final norm and the tied embedding/output head (see the module docstring).
HEAD_PARAMETERS = ("norm.weight", "tok_emb.weight")
_BLOCK = re.compile(r"^blocks\.(\d+)\.")


def block_index(name: str) -> int | None:
    """The transformer block a parameter belongs to (``blocks.3.mlp.w1.weight`` -> 3), else None."""
    match = _BLOCK.match(name)
    return int(match.group(1)) if match else None


def frozen_parameters(
    names: Iterable[str],
    n_layers: int,
    patterns: Iterable[str] = (),
    trainable_last_layers: int | None = None,
    train_head: bool = True,
) -> frozenset[str]:
    """The parameter names a fine-tune freezes (``requires_grad = False``).

    A parameter is frozen when any ``patterns`` entry matches its name (``fnmatch``: ``*``
    matches dots too, so ``blocks.0.*`` is the whole first block), or, with
    ``trainable_last_layers = N``, when it is outside the last ``N`` blocks (and outside the head
    while ``train_head``), or, with ``train_head`` false, when it is the head
    (:data:`HEAD_PARAMETERS`).

    Example: 4 blocks, ``trainable_last_layers=1``: blocks 0-2 are frozen; ``blocks.3.*``,
    ``norm.weight`` and ``tok_emb.weight`` train (with ``train_head=False`` only ``blocks.3.*``).

    Args:
        names: Every parameter name of the full (unsharded) model.
        n_layers: Number of transformer blocks.
        patterns: ``train.freeze`` entries.
        trainable_last_layers: ``train.trainable_last_layers`` (``None``: not set).
        train_head: ``train.train_head``.

    Raises:
        ValueError: a pattern matches no parameter (it is named), ``trainable_last_layers`` is
            negative or above ``n_layers``, or nothing would be left to train.
    """
    names = list(names)
    frozen: set[str] = set()
    for pattern in patterns:
        matched = fnmatch.filter(names, pattern)
        if not matched:
            raise ValueError(
                f"train.freeze pattern {pattern!r} matches no parameter; names look like "
                f"{', '.join(names[:3])} (see `mla.freeze.parameter_shapes` for all of them)"
            )
        frozen.update(matched)
    if trainable_last_layers is not None:
        frozen.update(_outside_last_layers(names, n_layers, trainable_last_layers))
    if not train_head:
        frozen.update(n for n in names if n in HEAD_PARAMETERS)
    if names and frozen >= set(names):
        head = "" if train_head else "set train.train_head=true, "
        raise ValueError(
            "train.freeze / train.trainable_last_layers / train.train_head freeze every "
            f"parameter: nothing would train; raise train.trainable_last_layers, {head}or drop "
            "a train.freeze pattern"
        )
    return frozenset(frozen)


def _outside_last_layers(names: list[str], n_layers: int, last: int) -> list[str]:
    if not 0 <= last <= n_layers:
        raise ValueError(
            f"train.trainable_last_layers({last}) must be between 0 and model.n_layers"
            f"({n_layers}); set it to at most {n_layers}"
        )
    first_trainable = n_layers - last
    return [
        n
        for n in names
        if n not in HEAD_PARAMETERS and ((idx := block_index(n)) is None or idx < first_trainable)
    ]


def count_trainable(
    shapes: Mapping[str, tuple[int, ...]], frozen: Iterable[str]
) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts (elements) of a model's ``{name: shape}``."""
    frozen = set(frozen)
    sizes = {n: _numel(s) for n, s in shapes.items()}
    total = sum(sizes.values())
    return total - sum(sizes[n] for n in frozen if n in sizes), total


def _numel(shape: tuple[int, ...]) -> int:
    out = 1
    for d in shape:
        out *= int(d)
    return out


def parameter_shapes(cfg) -> dict[str, tuple[int, ...]]:
    """``{name: shape}`` of every parameter of ``MLATransformer(cfg)`` (built on the meta
    device: no memory, no initialisation), the tied head counted once."""
    import torch

    from mla.model import MLATransformer

    with torch.device("meta"):
        model = MLATransformer(cfg)
    return {n: tuple(p.shape) for n, p in model.named_parameters()}
