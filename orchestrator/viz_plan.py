"""``mla viz plan PLAN_JSON``: memory per GPU of each candidate layout of ``mla plan --json``.

One stacked bar per candidate (parameters, gradients, optimizer state, activations, buffers, in
GiB, as the planner's memory model splits them: :mod:`orchestrator.planner.memory`) and the
GPU's usable memory as a dashed line, so what makes a layout fit or not is visible at a glance.
"""

from __future__ import annotations

import json
from pathlib import Path

from orchestrator.contract.errors import ConfigError

PARTS = ("parameters", "gradients", "optimizer", "activations", "buffers")
"""Memory components of a planner estimate, bottom to top."""


def read_plan(path: str) -> dict:
    """The JSON document of ``mla plan --json`` from ``path`` (``-``: stdin).

    Raises:
        ConfigError: unreadable, not JSON, or without ``candidates``.
    """
    import sys

    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text()
        plan = json.loads(text)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: not the JSON of `mla plan --json` ({exc})") from None
    if not isinstance(plan, dict) or not plan.get("candidates"):
        raise ConfigError(f"{path}: no candidates; write it with `mla plan ... --json > {path}`")
    return plan


def layout_name(layout: dict) -> str:
    """Short bar label, e.g. ``dp16 tp1 pp1\\nz2 mb1``."""
    return (
        f"dp{layout['dp']} tp{layout['tp']} pp{layout['pp']}\n"
        f"z{layout['zero_stage']} mb{layout['micro_batch']}"
    )


def plan_figure(plan: dict):
    """Stacked memory bars per candidate, with the GPU limit."""
    from matplotlib.figure import Figure

    candidates = plan["candidates"]
    fig = Figure(figsize=(max(6, 1.3 * len(candidates)), 4.5), dpi=100)
    ax = fig.subplots()
    x = list(range(len(candidates)))
    bottom = [0.0] * len(candidates)
    for part in PARTS:
        heights = [float(c["estimate"]["memory_gib"].get(part, 0.0)) for c in candidates]
        ax.bar(x, heights, bottom=bottom, label=part)
        bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
    limit = candidates[0]["estimate"].get("memory_limit_gib")
    if limit:
        ax.axhline(limit, color="black", ls="--", lw=1, label=f"GPU limit {limit} GiB")
    ax.set_xticks(x, [layout_name(c["layout"]) for c in candidates], fontsize=7)
    ax.set_ylabel("memory per GPU (GiB)")
    ax.legend(fontsize=7)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def plot_plan(path: str, out: Path) -> Path:
    """Write the :func:`plan_figure` of the plan JSON at ``path`` to ``out``."""
    from orchestrator.viz_run import save_png

    return save_png(plan_figure(read_plan(path)), out)
