"""mla: the Dynamic Multi-Level Attention (MLA) model library.

"MLA" here is *Dynamic Multi-Level Attention*: a causal local sliding-window branch plus a sparse
global branch over selected key blocks (:mod:`mla.block_selection`), mixed per head by a learned
input-dependent gate. It is not DeepSeek-V2's
Multi-head Latent Attention.

Torch-based names are imported lazily (PEP 562), so ``import mla.config`` and ``import
mla.flops`` stay free of torch for the planner and the CLI. This package never imports Ray or
DeepSpeed.
"""

from __future__ import annotations

import importlib

from mla.config import PRESETS, ModelConfig, get_preset

_LAZY = {
    "MultiLevelAttention": "mla.attention",
    "dense_reference_attention": "mla.reference",
    "select_blocks": "mla.block_selection",
    "MLATransformer": "mla.model",
    "load_pretrained": "mla.pretrained",
    "save_pretrained": "mla.pretrained",
    "count_parameters": "mla.flops",
    "training_flops_per_token": "mla.flops",
}

__all__ = ["PRESETS", "ModelConfig", "get_preset", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mla' has no attribute {name!r}")
