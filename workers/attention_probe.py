"""Attention maps for TensorBoard at evaluation steps, without an extra forward pass.

During a validation pass the probe keeps what the attention layers of a few blocks received on
the pass's first forward (batch row 0: the same held-out window at every evaluation, so the maps
of successive evaluations are comparable), cut to at most :data:`PROBE_TOKENS` tokens, a
multiple of the block size (a causal prefix: its map equals the full sequence's top-left
corner). The map itself is :func:`mla.attention_map.attention_map_from_input`.

Only where the layer holds every head and its whole weights: tensor-parallel degree 1 and ZeRO
stage <= 2 (ZeRO-3 partitions the weights outside the forward pass); with pipeline parallelism,
the blocks of this rank's stage.
"""

from __future__ import annotations

import torch
from torch.utils.hooks import RemovableHandle

from mla.attention import MultiLevelAttention
from mla.attention_map import AttentionMap, attention_map_from_input
from mla.config import ModelConfig
from workers.hook_probe import HookProbe

PROBE_TOKENS = 128
"""Longest probe prefix, in tokens (the map costs O(n^2) per head)."""


class AttentionProbe(HookProbe):
    """Context manager that captures the first input of the attention layers of the first and
    the last block found in ``module``, and computes their maps on request."""

    def __init__(self, module: torch.nn.Module, cfg: ModelConfig):
        found = sorted(
            (m for m in module.modules() if isinstance(m, MultiLevelAttention)),
            key=lambda m: m.layer_idx,
        )
        self.layers: dict[int, MultiLevelAttention] = {
            m.layer_idx: m for m in found[:1] + found[-1:]
        }
        self.cfg, self.block_size = cfg, cfg.block_size
        self._inputs: dict[int, torch.Tensor] = {}

    def register(self) -> list[RemovableHandle]:
        return [
            attn.register_forward_pre_hook(self._hook(idx)) for idx, attn in self.layers.items()
        ]

    def _hook(self, idx: int):
        def keep(_module, args) -> None:
            if idx not in self._inputs:
                x = args[0]
                n = min(x.shape[1], PROBE_TOKENS)
                if n >= self.block_size:
                    n -= n % self.block_size
                self._inputs[idx] = x[:1, :n].detach().clone()

        return keep

    def maps(self) -> dict[int, AttentionMap]:
        """Layer index -> effective attention on the captured probe prefix."""
        return {
            idx: attention_map_from_input(self.layers[idx], x, self.cfg)
            for idx, x in self._inputs.items()
        }
