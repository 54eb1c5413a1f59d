"""Base of the probes that watch a model through forward hooks while a ``with`` block runs.

PyTorch's hooks return handles to remove; this base registers them on entry and removes them on
exit, so a probe never outlives its block (:class:`.gate_probe.GateProbe`,
:class:`.attention_probe.AttentionProbe`).
"""

from __future__ import annotations

from typing import Self

from torch.utils.hooks import RemovableHandle


class HookProbe:
    """Subclasses implement :meth:`register`; ``with probe:`` installs and removes the hooks."""

    _handles: list[RemovableHandle] = []

    def register(self) -> list[RemovableHandle]:
        """Install the hooks; return their handles."""
        raise NotImplementedError

    def __enter__(self) -> Self:
        self._handles = self.register()
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
