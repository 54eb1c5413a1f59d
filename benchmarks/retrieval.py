"""Passkey retrieval: does the global branch carry information from beyond the window?

A synthetic passkey task (after the passkey test of Mohtashami & Jaggi 2023, "Landmark
Attention", arXiv:2305.16300, Sec. 4.2, where attention restricted to a window fails past its
span): a sequence of random filler tokens holds one planted pair, a key token immediately followed
by its value token; the sequence ends with the key again, and the model must predict the value.
``d`` is the distance from the value to the final query position, so the value lies inside the
local window for ``d < w``, inside the stacked windows' receptive field for ``d <= n_layers *
(w - 1)`` and beyond it otherwise. Keys, values and filler come from disjoint parts of the
vocabulary, so the answer is determined by the sequence alone (chance = 1 / number of values).

Three models of the same shape are trained from scratch on the same sequences in the same order
(loss on the answer token only, AdamW): ``dense`` (causal softmax over every earlier token, the
ceiling), ``window`` (MLA with the global branch switched off, ``mix="local"``) and ``mla`` (local
window + block-selection global branch, gated). Accuracy of the value is then measured at fixed
distances, from inside the window through the receptive field to the full context.

Run: ``mla bench retrieval [--json] [--plot PATH]`` or ``python -m benchmarks.retrieval``.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from mla.config import ModelConfig
from mla.model import MLATransformer

#: The attention variants compared, as :class:`ModelConfig` fields.
MODEL_KINDS: dict[str, dict[str, Any]] = {
    "dense": {"attention": "dense"},
    "window": {"attention": "mla", "mix": "local"},
    "mla": {"attention": "mla", "mix": "gate"},
}


@dataclass(frozen=True)
class RetrievalSettings:
    """Task, model and training settings.

    Attributes:
        seq_len: Tokens per sequence n (the query is the last one).
        n_filler, n_keys, n_values: Sizes of the three disjoint vocabulary ranges.
        steps: Optimizer steps per model.
        batch: Sequences per step.
        lr: Peak AdamW learning rate (linear warm-up over 5% of the steps, cosine decay to 10%).
        eval_distances: Distances d (tokens from the value to the query) scored after training.
        eval_sequences: Sequences scored per distance.
        seed: Initialisation and data seed.
        threads: CPU intra-op threads (``None``: torch's default).
        d_model, n_layers, n_heads, ffn_hidden: Model shape.
        local_window, global_k, block_size: MLA settings.
        models: Which models to train, among :data:`MODEL_KINDS`.
    """

    seq_len: int = 128
    n_filler: int = 32
    n_keys: int = 8
    n_values: int = 16
    steps: int = 600
    batch: int = 32
    lr: float = 3e-3
    eval_distances: tuple[int, ...] = (4, 12, 24, 48, 96, 124)
    eval_sequences: int = 256
    seed: int = 0
    threads: int | None = None
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 2
    ffn_hidden: int = 128
    local_window: int = 8
    global_k: int = 16
    block_size: int = 16
    models: tuple[str, ...] = ("dense", "window", "mla")

    @property
    def vocab_size(self) -> int:
        """Filler, key and value tokens together."""
        return self.n_filler + self.n_keys + self.n_values

    @property
    def receptive_field(self) -> int:
        """Farthest distance the stacked windows reach: ``n_layers * (w - 1)`` tokens."""
        return self.n_layers * (self.local_window - 1)

    def model_config(self, kind: str) -> ModelConfig:
        """The shared model shape as ``kind`` (one of :data:`MODEL_KINDS`)."""
        return ModelConfig(
            vocab_size=self.vocab_size,
            d_model=self.d_model,
            n_layers=self.n_layers,
            n_heads=self.n_heads,
            ffn_hidden=self.ffn_hidden,
            max_seq_len=self.seq_len,
            local_window=self.local_window,
            global_k=self.global_k,
            block_size=self.block_size,
            **MODEL_KINDS[kind],
        )


@dataclass(frozen=True)
class PasskeyBatch:
    """Sequences of the passkey task.

    Attributes:
        tokens: int64 ``(batch, seq_len)``; the last token is the key (the query).
        answers: int64 ``(batch,)``: the value planted right after the key's first occurrence.
        value_pos: int64 ``(batch,)``: position of the planted value, ``seq_len - 1 - d``.
    """

    tokens: np.ndarray
    answers: np.ndarray
    value_pos: np.ndarray


def passkey_batch(
    rng: np.random.Generator, s: RetrievalSettings, distances: np.ndarray
) -> PasskeyBatch:
    """One batch of the passkey task, value ``d`` tokens before the query (per sequence).

    Token ids: filler ``[0, n_filler)``, keys ``[n_filler, n_filler + n_keys)``, values above.
    Sequence ``b``: filler everywhere, key at ``n - 2 - d``, value at ``n - 1 - d``, key again at
    ``n - 1``.

    Args:
        rng: Source of randomness.
        s: Settings (sizes).
        distances: int ``(batch,)``, each in ``[1, seq_len - 2]``.

    Returns:
        The batch.

    Raises:
        ValueError: a distance outside ``[1, seq_len - 2]``.
    """
    n, d = s.seq_len, np.asarray(distances, dtype=np.int64)
    if d.size and (d.min() < 1 or d.max() > n - 2):
        raise ValueError(f"distances must lie in [1, seq_len - 2 = {n - 2}], got {d.tolist()}")
    rows = np.arange(len(d))
    tokens = rng.integers(0, s.n_filler, size=(len(d), n))
    keys = s.n_filler + rng.integers(0, s.n_keys, size=len(d))
    values = s.n_filler + s.n_keys + rng.integers(0, s.n_values, size=len(d))
    value_pos = n - 1 - d
    tokens[rows, value_pos - 1] = keys
    tokens[rows, value_pos] = values
    tokens[:, -1] = keys
    return PasskeyBatch(tokens.astype(np.int64), values.astype(np.int64), value_pos)


def answer_logits(model: MLATransformer, tokens: np.ndarray) -> torch.Tensor:
    """Logits ``(batch, vocab)`` of the model at the query (last) position."""
    return model(torch.from_numpy(tokens))[:, -1]


def lr_at(step: int, s: RetrievalSettings) -> float:
    """Linear warm-up (5% of steps) then cosine decay to 10% of ``s.lr``."""
    warm = max(1, s.steps // 20)
    if step < warm:
        return s.lr * (step + 1) / warm
    progress = (step - warm) / max(1, s.steps - warm)
    return s.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(kind: str, s: RetrievalSettings, log) -> tuple[MLATransformer, float]:
    """Train one model on the answer token; returns it and the wall time in seconds.

    Every model sees the same sequences: the data generator is reseeded with ``s.seed``.
    """
    torch.manual_seed(s.seed)
    rng = np.random.default_rng(s.seed)
    model = MLATransformer(s.model_config(kind))
    opt = torch.optim.AdamW(model.parameters(), lr=s.lr, betas=(0.9, 0.95), weight_decay=0.0)
    start = time.perf_counter()
    for step in range(s.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, s)
        batch = passkey_batch(rng, s, rng.integers(1, s.seq_len - 1, size=s.batch))
        loss = F.cross_entropy(answer_logits(model, batch.tokens), torch.from_numpy(batch.answers))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 100 == 0 or step == s.steps - 1:
            log(f"{kind:6s} step {step:4d}/{s.steps} loss {loss.item():.3f}")
    return model, time.perf_counter() - start


@torch.no_grad()
def accuracy_by_distance(model: MLATransformer, s: RetrievalSettings) -> dict[int, float]:
    """Fraction of ``s.eval_sequences`` held-out sequences answered right, per distance."""
    model.eval()
    rng = np.random.default_rng(s.seed + 1_000_003)  # never the training stream
    out = {}
    for d in s.eval_distances:
        batch = passkey_batch(rng, s, np.full(s.eval_sequences, d))
        pred = answer_logits(model, batch.tokens).argmax(-1).numpy()
        out[d] = float((pred == batch.answers).mean())
    model.train()
    return out


def region(d: int, s: RetrievalSettings) -> str:
    """Where distance ``d`` lies: inside the window, the receptive field, or beyond it."""
    if d < s.local_window:
        return "window"
    return "receptive field" if d <= s.receptive_field else "beyond"


def run_retrieval(s: RetrievalSettings, log=lambda msg: None) -> dict:
    """Train the models of ``s.models`` and score them; returns the report dictionary.

    Raises:
        ValueError: an unknown model kind or an evaluation distance outside the sequence.
    """
    unknown = [m for m in s.models if m not in MODEL_KINDS]
    if unknown or not s.models:
        raise ValueError(f"models={s.models!r} must name only {', '.join(MODEL_KINDS)}")
    if min(s.eval_distances) < 1 or max(s.eval_distances) > s.seq_len - 2:
        raise ValueError(
            f"eval_distances={s.eval_distances} must lie in [1, seq_len - 2 = {s.seq_len - 2}]"
        )
    if s.threads:
        torch.set_num_threads(s.threads)
    report: dict = {
        "settings": asdict(s),
        "receptive_field": s.receptive_field,
        "chance": 1.0 / s.n_values,
        "models": {},
    }
    for kind in s.models:
        model, seconds = train(kind, s, log)
        acc = accuracy_by_distance(model, s)
        report["models"][kind] = {
            "parameters": sum(p.numel() for p in model.parameters()),
            "train_seconds": round(seconds, 1),
            "accuracy": {str(d): a for d, a in acc.items()},
        }
    return report


def render(report: dict, console) -> None:
    """Print accuracy by distance (rich table)."""
    from rich.table import Table

    s = RetrievalSettings(**{**report["settings"], "eval_distances": (1,), "models": ("dense",)})
    table = Table(
        title=f"passkey accuracy by distance (w={s.local_window}, n_layers={s.n_layers}, "
        f"receptive field {report['receptive_field']}, chance {report['chance']:.3f})"
    )
    table.add_column("distance d", justify="right")
    table.add_column("region")
    for kind in report["models"]:
        table.add_column(kind, justify="right")
    for d in report["settings"]["eval_distances"]:
        accs = [m["accuracy"][str(d)] for m in report["models"].values()]
        table.add_row(str(d), region(d, s), *(f"{100 * a:.1f}%" for a in accs))
    console.print(table)
    times = ", ".join(f"{k} {m['train_seconds']} s" for k, m in report["models"].items())
    console.print(f"train time: {times}")


def plot(report: dict, path: str) -> None:
    """Accuracy against distance, one line per model, the window and receptive field marked;
    written atomically to ``path`` (PNG)."""
    import os

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    distances = report["settings"]["eval_distances"]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    styles = {"dense": ("s", "--", 9), "window": ("o", "-", 6), "mla": ("^", "-", 6)}
    for kind, m in report["models"].items():
        marker, line, size = styles.get(kind, ("o", "-", 6))
        acc = [m["accuracy"][str(d)] for d in distances]
        ax.plot(distances, acc, marker=marker, ls=line, ms=size, label=kind)  # dense may hide
    ax.axvline(report["settings"]["local_window"], ls=":", c="grey", label="window w")
    ax.axvline(report["receptive_field"], ls="--", c="grey", label="n_layers x (w - 1)")
    ax.axhline(report["chance"], ls="-.", c="black", lw=0.8, label="chance")
    ax.set(xscale="log", xlabel="distance d (tokens)", ylabel="accuracy", ylim=(0, 1.05))
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = f"{path}.tmp.png"
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def main(argv: list[str]) -> None:
    """``python -m benchmarks.retrieval [--json]`` with the default settings."""
    from orchestrator.cli_common import err as console

    report = run_retrieval(RetrievalSettings(), log=console.log)
    render(report, console)
    if "--json" in argv:
        print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main(sys.argv[1:])
