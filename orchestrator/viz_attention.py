"""``mla viz attention SOURCE --layer L --head H [--text T]``: a heat map of where a head looks;
``mla viz gates SOURCE``: the mean gate per layer and head.

The matrix is the effective attention of :func:`mla.attention_map.effective_attention`
(``g * local + (1 - g) * global`` from the dense reference path) on the text's byte tokens;
the sliding-window band is outlined in white and the global branch's keys (its own block and the
selected earlier blocks, or the exact top-k) in red. Short texts (<= 48 tokens) get their bytes
as axis labels. torch and matplotlib are imported inside the functions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from orchestrator.contract.errors import ConfigError

PROBE_TEXT = (
    "def fibonacci(n):\n"
    '    """Return the n-th Fibonacci number."""\n'
    "    a, b = 0, 1\n"
    "    for _ in range(n):\n"
    "        a, b = b, a + b\n"
    "    return a\n"
)
"""Default probe: Python source, like the default training corpus (the standard library)."""
MAX_LABELLED_TOKENS = 48


def attention_figure(amap: Any, head: int, labels: list[str] | None = None, title: str = ""):
    """The heat map of ``amap.weights[head]`` with the branches outlined (a matplotlib Figure)."""
    import numpy as np
    from matplotlib.figure import Figure

    weights = amap.weights[head].numpy()
    n = weights.shape[0]
    fig = Figure(figsize=(7, 6), dpi=100)
    ax = fig.subplots()
    # the first queries see a single key (weight 1): scale to the 99th percentile instead
    vmax = float(np.quantile(weights[weights > 0], 0.99)) if (weights > 0).any() else 1.0
    image = ax.imshow(weights, cmap="viridis", vmin=0.0, vmax=vmax)
    fig.colorbar(image, ax=ax, label="attention weight")
    for mask, colour in ((amap.local_mask, "white"), (amap.global_mask[head], "red")):
        ax.contour(mask.numpy().astype(float), levels=[0.5], colors=colour, linewidths=0.8)
    if labels is not None and n <= MAX_LABELLED_TOKENS:
        ax.set_xticks(range(n), labels, rotation=90, fontsize=6)
        ax.set_yticks(range(n), labels, fontsize=6)
    ax.set_xlabel("key position (white: local band, red: global keys)")
    ax.set_ylabel("query position")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def _label(byte: int) -> str:
    char = chr(byte)
    return {"\n": "\\n", " ": "␣", "\t": "\\t"}.get(
        char, char if char.isprintable() else f"{byte:02x}"
    )


def plot_attention(source: str, layer: int, head: int, text: str | None, out: Path) -> Path:
    """Write the heat map of ``head`` in block ``layer`` of the model at ``source`` on ``text``
    (``None``: :data:`PROBE_TEXT`, cut to the model's ``max_seq_len``).

    Raises:
        ConfigError: empty text, text longer than the model's ``max_seq_len``, or a layer or head
            outside the model (each names the option and the allowed range).
        CheckpointError: ``source`` cannot be loaded (see :func:`workers.inference.load_model`).
    """
    import torch

    from mla.attention_map import effective_attention
    from orchestrator.viz_run import save_png
    from workers.inference import load_model

    loaded = load_model(source)
    cfg = loaded.cfg
    if not 0 <= layer < cfg.n_layers:
        raise ConfigError(f"--layer={layer} is outside 0..{cfg.n_layers - 1}")
    if not 0 <= head < cfg.n_heads:
        raise ConfigError(f"--head={head} is outside 0..{cfg.n_heads - 1}")
    tokens = list((PROBE_TEXT if text is None else text).encode("utf-8"))
    if text is None:
        tokens = tokens[: cfg.max_seq_len]
    if not tokens or len(tokens) > cfg.max_seq_len:
        raise ConfigError(
            f"--text has {len(tokens)} bytes; give 1..{cfg.max_seq_len} (model.max_seq_len)"
        )
    if cfg.attention != "mla":
        raise ConfigError(f"{source} is a dense-attention model: it has no local/global branches")
    amap = effective_attention(loaded.model, torch.tensor(tokens), layer)
    step = f" step {loaded.step}" if loaded.step is not None else ""
    fig = attention_figure(
        amap,
        head,
        [_label(t) for t in tokens],
        f"{Path(source).name}{step}: layer {layer}, head {head}",
    )
    return save_png(fig, out)


def gates_figure(head_means: dict[int, list[float]], title: str = ""):
    """Layer x head heat map of the mean gate g (1: all local branch, 0: all global)."""
    import numpy as np
    from matplotlib.figure import Figure

    layers = sorted(head_means)
    grid = np.array([head_means[layer] for layer in layers])
    fig = Figure(figsize=(1.2 + 0.6 * grid.shape[1], 1.2 + 0.5 * len(layers)), dpi=100)
    ax = fig.subplots()
    image = ax.imshow(grid, cmap="coolwarm", vmin=0.0, vmax=1.0, aspect="auto")
    fig.colorbar(image, ax=ax, label="mean gate (local share)")
    for (row, col), value in np.ndenumerate(grid):
        ax.text(col, row, f"{value:.2f}", ha="center", va="center", fontsize=7)
    ax.set_xticks(range(grid.shape[1]))
    ax.set_yticks(range(len(layers)), [str(layer) for layer in layers])
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def plot_gates(source: str, text: str | None, out: Path) -> Path:
    """Write the :func:`gates_figure` of the model at ``source`` on ``text`` (``None``: the
    probe text cut to ``max_seq_len``).

    Raises:
        ConfigError: the model has no gate (dense attention or ``mix="sum"``), or the text is
            empty or longer than ``max_seq_len``.
        CheckpointError: ``source`` cannot be loaded.
    """
    import torch

    from orchestrator.viz_run import save_png
    from workers.gate_probe import GateProbe
    from workers.inference import load_model

    loaded = load_model(source)
    cfg = loaded.cfg
    if cfg.attention != "mla" or cfg.mix != "gate":
        raise ConfigError(f"{source} has no gate (attention={cfg.attention}, mix={cfg.mix})")
    tokens = list((PROBE_TEXT if text is None else text).encode("utf-8"))
    tokens = tokens[: cfg.max_seq_len] if text is None else tokens
    if not tokens or len(tokens) > cfg.max_seq_len:
        raise ConfigError(
            f"--text has {len(tokens)} bytes; give 1..{cfg.max_seq_len} (model.max_seq_len)"
        )
    with GateProbe(loaded.model) as probe, torch.no_grad():
        loaded.model(torch.tensor(tokens).view(1, -1))
    step = f" step {loaded.step}" if loaded.step is not None else ""
    return save_png(gates_figure(probe.head_means(), f"{Path(source).name}{step}: mean gate"), out)
