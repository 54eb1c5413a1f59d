"""Quality benchmark: dense vs MLA vs window-only versions of the same small LM, same tokens.

The models share every setting except the attention (``dense``: causal softmax over every earlier
token; ``mla``: sliding window + block-selection global branch, gated; ``window``: the same MLA
layer with the global branch switched off, ``mix="local"``) and the gate parameters MLA adds; they
are initialised from the same seed, see the same train windows in the same order (byte-level
tokens of the Python standard library sources, split by file, :func:`workers.data.load_corpus`)
and are trained with the same AdamW schedule for the same number of tokens with a plain torch
loop. Validation loss (nats/token) is then measured on the same held-out windows at a short and a
long context, with the relative gap ``(mla - dense) / dense``, and, at every context, per position
bucket (``[0, w)``, ``[w, 2w)``, ``[2w, 4w)``, ... up to the context: loss against position, the
usual long-context check, so the benefit of context beyond the window shows where it appears).

Run: ``mla bench quality [--models dense,mla,window] [--json]`` or
``python -m benchmarks.quality [--json]``.
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

from mla.config import IndexerKind, ModelConfig
from mla.model import MLATransformer
from workers.data import WindowBatches, load_corpus


@dataclass(frozen=True)
class QualitySettings:
    """What to train and how to evaluate.

    Attributes:
        steps: Optimizer steps per model.
        batch: Sequences per step.
        train_seq_len: Training sequence length, in tokens.
        eval_contexts: Validation context lengths, in tokens (short, long).
        eval_tokens: Validation tokens scored per context (a whole number of windows).
        lr: Peak AdamW learning rate (linear warm-up over 10% of steps, cosine decay to 10%).
        seed: Initialisation and data-order seed.
        threads: CPU intra-op threads (``None``: torch's default).
        d_model, n_layers, n_heads, ffn_hidden: Model shape (vocab 256, byte-level).
        local_window, global_k, block_size, indexer: MLA settings. The block selection gets
            two blocks of 32 (64 earlier keys) per query block: with one block of 64 (B = w,
            ``global_k=32``), the global branch's own block repeats the window and its single
            selected block is too coarse a choice (+3.6% vs dense at context 1024, against +0.4%
            with these settings, side by side, 2026-12-01).
        models: Which models to train, among ``MODEL_KINDS`` (``"dense"`` first: gaps are
            relative to it).
        processes: Models trained at once, each in its own process (1: one after the other;
            the losses are the same, the wall times then share the machine).
    """

    steps: int = 96
    batch: int = 8
    train_seq_len: int = 1024
    eval_contexts: tuple[int, ...] = (256, 1024)
    eval_tokens: int = 65536
    lr: float = 3e-3
    seed: int = 0
    threads: int | None = None
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    ffn_hidden: int = 352
    local_window: int = 64
    global_k: int = 64
    block_size: int = 32
    indexer: IndexerKind = "block"
    models: tuple[str, ...] = ("dense", "mla", "window")
    processes: int = 1

    def model_config(self, kind: str) -> ModelConfig:
        """The shared model shape as ``kind`` (one of :data:`MODEL_KINDS`)."""
        return ModelConfig(
            vocab_size=256,
            d_model=self.d_model,
            n_layers=self.n_layers,
            n_heads=self.n_heads,
            ffn_hidden=self.ffn_hidden,
            max_seq_len=max(self.train_seq_len, *self.eval_contexts),
            local_window=self.local_window,
            global_k=self.global_k,
            block_size=self.block_size,
            indexer=self.indexer,
            **MODEL_KINDS[kind],
        )


#: The attention variants compared, as :class:`ModelConfig` fields.
MODEL_KINDS: dict[str, dict[str, Any]] = {
    "dense": {"attention": "dense"},
    "mla": {"attention": "mla", "mix": "gate"},
    "window": {"attention": "mla", "mix": "local"},
    "sum": {"attention": "mla", "mix": "sum"},  # MLA with the branches summed (gate ablation)
}


def position_buckets(context: int, window: int) -> list[tuple[int, int]]:
    """Position buckets ``[0, w), [w, 2w), [2w, 4w), ...``, the last one ending at ``context``.

    Example: ``position_buckets(1024, 64)`` -> ``[(0, 64), (64, 128), (128, 256), (256, 512),
    (512, 1024)]``; ``position_buckets(100, 64)`` -> ``[(0, 64), (64, 100)]``.
    """
    bounds, end = [], min(window, context)
    start = 0
    while start < context:
        bounds.append((start, end))
        start, end = end, min(2 * end, context)
    return bounds


def lr_at(step: int, s: QualitySettings) -> float:
    """Linear warm-up (10% of steps) then cosine decay to 10% of ``s.lr``."""
    warm = max(1, s.steps // 10)
    if step < warm:
        return s.lr * (step + 1) / warm
    progress = (step - warm) / max(1, s.steps - warm)
    return s.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def lm_loss(model: MLATransformer, x: np.ndarray, y: np.ndarray) -> torch.Tensor:
    """Mean next-token cross-entropy (nats) of ``model`` on inputs/targets ``(batch, seq)``."""
    logits = model(torch.from_numpy(x))
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), torch.from_numpy(y).reshape(-1))


def train(
    kind: str, s: QualitySettings, train_tokens: np.ndarray, log
) -> tuple[MLATransformer, float]:
    """Train one model (``kind`` of :data:`MODEL_KINDS`); returns it and the wall time in s."""
    torch.manual_seed(s.seed)
    model = MLATransformer(s.model_config(kind))
    opt = torch.optim.AdamW(model.parameters(), lr=s.lr, betas=(0.9, 0.95), weight_decay=0.1)
    batches = WindowBatches(train_tokens, s.train_seq_len, seed=s.seed)
    start = time.perf_counter()
    for step in range(s.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, s)
        x, y = batches.rank_slice(step, s.batch, 0, 1)
        loss = lm_loss(model, x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 25 == 0 or step == s.steps - 1:
            elapsed = time.perf_counter() - start
            tok_s = (step + 1) * s.batch * s.train_seq_len / elapsed
            log(f"{kind:6s} step {step:4d}/{s.steps} loss {loss.item():.3f} {tok_s:,.0f} tok/s")
    return model, time.perf_counter() - start


@torch.no_grad()
def evaluate(
    model: MLATransformer, val_tokens: np.ndarray, context: int, eval_tokens: int
) -> float:
    """Mean validation loss (nats/token) over the first ``eval_tokens // context`` windows."""
    return float(position_losses(model, val_tokens, context, eval_tokens).mean())


@torch.no_grad()
def position_losses(
    model: MLATransformer, val_tokens: np.ndarray, context: int, eval_tokens: int
) -> np.ndarray:
    """Validation loss (nats/token) at every position ``(context,)``, averaged over the first
    ``eval_tokens // context`` windows (position t predicts token t + 1 from t + 1 tokens)."""
    model.eval()
    batches = WindowBatches(val_tokens, context, seed=0, shuffle=False)
    n_windows = max(1, min(batches.n_windows, eval_tokens // context))
    total = torch.zeros(context, dtype=torch.float64)
    for first in range(0, n_windows, 8):
        x, y = batches.windows(np.arange(first, min(first + 8, n_windows)))
        logits = model(torch.from_numpy(x))
        nll = F.cross_entropy(logits.transpose(1, 2), torch.from_numpy(y), reduction="none")
        total += nll.double().sum(0)
    model.train()
    return (total / n_windows).numpy()


def bucket_means(losses: np.ndarray, window: int) -> list[dict]:
    """Mean of per-position ``losses`` ``(context,)`` over :func:`position_buckets`."""
    return [
        {"start": a, "end": b, "loss": round(float(losses[a:b].mean()), 4)}
        for a, b in position_buckets(len(losses), window)
    ]


def train_and_score(kind: str, s: QualitySettings, log=lambda msg: None) -> dict[str, Any]:
    """Train one model and score it: ``{"train_seconds": s, "position_losses": {context:
    (context,) array}}``. Every call loads the corpus itself (so it can run in its own process)."""
    if s.threads:
        torch.set_num_threads(s.threads)
    corpus = load_corpus(None)
    log(f"corpus: {corpus.source}: {len(corpus.train):,} train / {len(corpus.val):,} val bytes")
    model, seconds = train(kind, s, corpus.train, log)
    return {
        "train_seconds": round(seconds, 1),
        "position_losses": {
            c: position_losses(model, corpus.val, c, s.eval_tokens) for c in s.eval_contexts
        },
    }


def _log_to_stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _score_in_processes(s: QualitySettings) -> dict[str, dict[str, Any]]:
    """:func:`train_and_score` for every model, ``s.processes`` at a time (spawned processes,
    each with ``s.threads`` intra-op threads); same results as one after the other."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    with ProcessPoolExecutor(min(s.processes, len(s.models)), get_context("spawn")) as pool:
        futures = {k: pool.submit(train_and_score, k, s, _log_to_stderr) for k in s.models}
        return {k: f.result() for k, f in futures.items()}


def run_quality(s: QualitySettings, log=lambda msg: None) -> dict:
    """Train the models of ``s.models``, evaluate them; returns the report dictionary.

    Raises:
        ValueError: ``s.models`` names an unknown kind or does not start with ``"dense"``.
    """
    unknown = [m for m in s.models if m not in MODEL_KINDS]
    if unknown or not s.models or s.models[0] != "dense":
        raise ValueError(
            f"models={s.models!r} must start with 'dense' and name only {', '.join(MODEL_KINDS)}"
        )
    report: dict[str, Any] = {
        "settings": asdict(s),
        "tokens_trained": s.steps * s.batch * s.train_seq_len,
        "results": [],
    }
    if s.processes > 1:
        scored = _score_in_processes(s)
    else:
        scored = {kind: train_and_score(kind, s, log) for kind in s.models}
    for kind in s.models:
        report[f"train_seconds_{kind}"] = scored[kind]["train_seconds"]
    for context in s.eval_contexts:
        row: dict = {"context": context, "position_buckets": {}}
        for kind in s.models:
            losses = scored[kind]["position_losses"][context]
            row[f"val_loss_{kind}"] = round(float(losses.mean()), 4)
            row["position_buckets"][kind] = bucket_means(losses, s.local_window)
        for kind in s.models[1:]:
            gap = (row[f"val_loss_{kind}"] - row["val_loss_dense"]) / row["val_loss_dense"]
            row["relative_gap" if kind == "mla" else f"relative_gap_{kind}"] = round(gap, 4)
        report["results"].append(row)
    return report


def render(report: dict, console) -> None:
    """Print the validation-loss table and the loss-against-position tables (rich)."""
    from rich.table import Table

    kinds = report["settings"]["models"]
    table = Table(
        title=f"validation loss (nats/token) after {report['tokens_trained']:,} train tokens"
    )
    table.add_column("context", justify="right")
    for kind in kinds:
        table.add_column(kind, justify="right")
    for kind in kinds[1:]:
        table.add_column(f"({kind} - dense) / dense", justify="right")
    for r in report["results"]:
        gaps = [r["relative_gap" if k == "mla" else f"relative_gap_{k}"] for k in kinds[1:]]
        table.add_row(
            str(r["context"]),
            *(f"{r[f'val_loss_{k}']:.4f}" for k in kinds),
            *(f"{100 * g:+.2f}%" for g in gaps),
        )
    console.print(table)
    for r in report["results"]:
        pos = Table(title=f"validation loss by position, context {r['context']}")
        pos.add_column("positions", justify="right")
        for kind in kinds:
            pos.add_column(kind, justify="right")
        buckets = r["position_buckets"]
        for i, b in enumerate(buckets[kinds[0]]):
            pos.add_row(
                f"{b['start']}-{b['end'] - 1}", *(f"{buckets[k][i]['loss']:.4f}" for k in kinds)
            )
        console.print(pos)
    times = ", ".join(f"{k} {report[f'train_seconds_{k}']} s" for k in kinds)
    console.print(f"train time: {times}")


def main(argv: list[str]) -> None:
    """``python -m benchmarks.quality [--json]`` with the default settings."""
    from orchestrator.cli_common import err as console

    report = run_quality(QualitySettings(), log=console.log)
    render(report, console)
    if "--json" in argv:
        print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main(sys.argv[1:])
