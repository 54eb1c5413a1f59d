"""Quality benchmark: dense vs MLA versions of the same small LM, same data, same tokens.

Both models share every setting except ``attention`` (and the gate parameters MLA adds); they
are initialised from the same seed, see the same train windows in the same order (byte-level
tokens of the Python standard library sources, split by file, :func:`workers.data.load_corpus`)
and are trained with the same AdamW schedule for the same number of tokens with a plain torch
loop. Validation loss (nats/token) is then measured on the same held-out windows at a short and a
long context, and the relative gap ``(mla - dense) / dense`` is reported.

Run: ``mla bench quality [--json]`` or ``python -m benchmarks.quality [--json]``.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from mla.config import ModelConfig
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
        local_window, global_k, block_size, indexer: MLA settings.
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
    global_k: int = 32
    block_size: int = 64
    indexer: str = "block"

    def model_config(self, attention: str) -> ModelConfig:
        """The shared model shape with ``attention`` = ``"dense"`` or ``"mla"``."""
        return ModelConfig(
            vocab_size=256,
            d_model=self.d_model,
            n_layers=self.n_layers,
            n_heads=self.n_heads,
            ffn_hidden=self.ffn_hidden,
            max_seq_len=max(self.train_seq_len, *self.eval_contexts),
            attention=attention,
            local_window=self.local_window,
            global_k=self.global_k,
            block_size=self.block_size,
            indexer=self.indexer,
        )


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
    attention: str, s: QualitySettings, train_tokens: np.ndarray, log
) -> tuple[MLATransformer, float]:
    """Train one model; returns it and the wall time in seconds."""
    torch.manual_seed(s.seed)
    model = MLATransformer(s.model_config(attention))
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
            log(
                f"{attention:5s} step {step:4d}/{s.steps} loss {loss.item():.3f} {tok_s:,.0f} tok/s"
            )
    return model, time.perf_counter() - start


@torch.no_grad()
def evaluate(
    model: MLATransformer, val_tokens: np.ndarray, context: int, eval_tokens: int
) -> float:
    """Mean validation loss (nats/token) over the first ``eval_tokens // context`` windows."""
    model.eval()
    batches = WindowBatches(val_tokens, context, seed=0, shuffle=False)
    n_windows = max(1, min(batches.n_windows, eval_tokens // context))
    losses = []
    for first in range(0, n_windows, 8):
        x, y = batches.windows(np.arange(first, min(first + 8, n_windows)))
        losses.append(lm_loss(model, x, y).item() * len(x))
    model.train()
    return sum(losses) / n_windows


def run_quality(s: QualitySettings, log=lambda msg: None) -> dict:
    """Train dense and MLA, evaluate both; returns the report dictionary."""
    if s.threads:
        torch.set_num_threads(s.threads)
    corpus = load_corpus(None)
    log(f"corpus: {corpus.source}: {len(corpus.train):,} train / {len(corpus.val):,} val bytes")
    report = {
        "settings": asdict(s),
        "tokens_trained": s.steps * s.batch * s.train_seq_len,
        "results": [],
    }
    models = {}
    for attention in ("dense", "mla"):
        models[attention], seconds = train(attention, s, corpus.train, log)
        report[f"train_seconds_{attention}"] = round(seconds, 1)
    for context in s.eval_contexts:
        dense = evaluate(models["dense"], corpus.val, context, s.eval_tokens)
        mla = evaluate(models["mla"], corpus.val, context, s.eval_tokens)
        report["results"].append(
            {
                "context": context,
                "val_loss_dense": round(dense, 4),
                "val_loss_mla": round(mla, 4),
                "relative_gap": round((mla - dense) / dense, 4),
            }
        )
    return report


def render(report: dict, console) -> None:
    """Print the validation-loss table (rich)."""
    from rich.table import Table

    table = Table(
        title=f"validation loss (nats/token) after {report['tokens_trained']:,} train tokens"
    )
    for col in ("context", "dense", "MLA", "(MLA - dense) / dense"):
        table.add_column(col, justify="right")
    for r in report["results"]:
        table.add_row(
            str(r["context"]),
            f"{r['val_loss_dense']:.4f}",
            f"{r['val_loss_mla']:.4f}",
            f"{100 * r['relative_gap']:+.2f}%",
        )
    console.print(table)
    console.print(
        f"train time: dense {report['train_seconds_dense']} s, MLA {report['train_seconds_mla']} s"
    )


def main(argv: list[str]) -> None:
    """``python -m benchmarks.quality [--json]`` with the default settings."""
    from rich.console import Console

    console = Console(stderr=True)
    report = run_quality(QualitySettings(), log=console.log)
    render(report, console)
    if "--json" in argv:
        print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main(sys.argv[1:])
