"""Mean gate per layer during a validation pass, by forward hooks (no model change).

The MLA mix is ``out = g * local + (1 - g) * global`` with ``g = sigmoid(W_gate x + b)`` per
head and query (:mod:`mla.attention`), so the mean of ``g`` over a layer's queries and heads
is the share of the local (sliding-window) branch in that layer.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch.utils.hooks import RemovableHandle

from workers.hook_probe import HookProbe


class GateProbe(HookProbe):
    """Context manager that averages ``sigmoid(w_gate(x))`` per layer of ``module``.

    Layers are found as submodules with a ``w_gate`` linear and a ``layer_idx`` (the
    :class:`mla.attention.MultiLevelAttention` of each block this rank holds: all blocks, or
    one pipeline stage's, with tensor parallelism this rank's heads). Models without a gate
    (``mix="sum"``, dense attention) give no layers.

    Example:
        >>> with GateProbe(model) as probe:
        ...     model(x)
        >>> probe.means()  # {0: 0.52, 1: 0.47, ...}
    """

    def __init__(self, module: torch.nn.Module):
        self.layers: list[tuple[int, torch.nn.Module]] = []
        for m in module.modules():
            linear, layer = getattr(m, "w_gate", None), getattr(m, "layer_idx", None)
            if isinstance(linear, torch.nn.Module) and isinstance(layer, int):
                self.layers.append((layer, linear))
        self._sums: dict[int, torch.Tensor] = {}
        self._counts: dict[int, int] = defaultdict(int)

    def register(self) -> list[RemovableHandle]:
        return [linear.register_forward_hook(self._hook(layer)) for layer, linear in self.layers]

    def _hook(self, layer: int):
        def record(_module, _inputs, output: torch.Tensor) -> None:
            gate = torch.sigmoid(output.detach().float())  # (batch, seq, heads)
            per_head = gate.reshape(-1, gate.shape[-1]).sum(0).cpu()
            self._sums[layer] = self._sums.get(layer, torch.zeros_like(per_head)) + per_head
            self._counts[layer] += gate.numel() // gate.shape[-1]

        return record

    def head_means(self) -> dict[int, list[float]]:
        """Layer index -> mean gate (0-1) of each head this rank holds, over everything seen
        inside the context."""
        return {
            layer: (self._sums[layer] / n).tolist()
            for layer, n in sorted(self._counts.items())
            if n
        }

    def means(self) -> dict[int, float]:
        """Layer index -> mean gate (0-1) over the layer's heads and queries."""
        return {layer: sum(h) / len(h) for layer, h in self.head_means().items()}
