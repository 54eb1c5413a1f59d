"""What the DeepSpeed workers can run (pure Python, so the controller checks before launch)."""

from __future__ import annotations

from workers.layout import Layout


def unsupported_reason(layout: Layout) -> str | None:
    """Why the workers cannot run ``layout``, or ``None`` when they can.

    The workers run any ``(dp, tp, pp)`` with ZeRO 0-3 (0-1 with pipelines, enforced by
    :class:`Layout` itself) and activation recomputation; they do not implement Megatron
    sequence parallelism or interleaved virtual pipeline stages (DeepSpeed's ``PipelineEngine``
    has no interleaved schedule).

    Example:
        >>> unsupported_reason(Layout(dp=2, tp=2, sequence_parallel=True))
        'sequence_parallel=True is not implemented by the DeepSpeed workers; set parallel.sequence_parallel=false'
    """
    if layout.sequence_parallel:
        return ("sequence_parallel=True is not implemented by the DeepSpeed workers; "
                "set parallel.sequence_parallel=false")
    if layout.virtual_stages > 1:
        return (f"virtual_stages={layout.virtual_stages}: DeepSpeed's PipelineEngine has no interleaved "
                "schedule; set parallel.virtual_stages=1")
    return None
