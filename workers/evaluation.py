"""Held-out loss of a trained model: loss, perplexity and bits per byte (``mla eval``).

Default data: the run's own validation split, cut and ordered exactly as the training loop's
``evaluate`` does it (:class:`workers.data.WindowBatches` over ``corpus.val`` with seed
``train.seed + 1``, the first ``min(train.eval_batches, n_windows // global_batch)`` global
batches), so the result reproduces the run's logged ``val_loss`` (the mean over equal
micro-batches of the mean token cross-entropy equals the mean over all those tokens). Other data
(``data_path``, anything :func:`workers.data.load_corpus` accepts) is scored on every
non-overlapping window of the chosen split, in order.

Metrics: ``loss`` = mean next-token cross-entropy in nats; ``perplexity = exp(loss)``;
``bits_per_byte = total nats / (ln 2 * UTF-8 bytes of the scored target tokens)`` (the
tokenizer-independent measure of Gao et al. 2020, "The Pile", §4: bits per UTF-8 byte), which
is ``loss / ln 2`` for the byte tokenizer and lower than ``loss / ln 2`` by the bytes per token
for BPE.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from mla.model import MLATransformer
from orchestrator.contract.errors import ConfigError
from workers.data import WindowBatches, load_corpus

#: Defaults of the training loop, used when a run folder has no ``job.json``.
DEFAULT_DATA = {"path": None, "val_fraction": 0.05, "seq_len": 128}


@dataclass(frozen=True)
class EvalData:
    """Windows to score: ``inputs``/``targets`` ``(n_windows, seq_len)`` int64, and their origin."""

    inputs: np.ndarray
    targets: np.ndarray
    description: str
    target_bytes: int | None = None
    """UTF-8 bytes the target tokens stand for (``None``: one byte a token)."""


def check_seq_len(seq_len: int, max_seq_len: int, trained_seq_len: int | None) -> str | None:
    """Refuse a sequence length the model cannot take; return a note when it exceeds training.

    Raises:
        ConfigError: ``seq_len < 1`` or ``seq_len > max_seq_len`` (the rotary table ends there).
    """
    if seq_len < 1:
        raise ConfigError(f"--seq-len={seq_len} must be a positive number of tokens")
    if seq_len > max_seq_len:
        raise ConfigError(
            f"--seq-len={seq_len} is longer than the model allows (max_seq_len={max_seq_len}: "
            f"its rotary table ends there); use --seq-len {max_seq_len} or less"
        )
    if trained_seq_len and seq_len > trained_seq_len:
        return (
            f"note: --seq-len={seq_len} is longer than the run trained on ({trained_seq_len}); positions past "
            "it were never trained"
        )
    return None


def eval_windows(
    job: dict | None,
    data_path: str | None,
    seq_len: int | None,
    split: str,
    max_windows: int | None,
    tokenizer=None,
) -> EvalData:
    """The windows ``mla eval`` scores (see the module docstring).

    Args:
        job: The run's job config dict (``job.json``), or ``None``.
        data_path: Other data to score, or ``None`` for the run's own data.
        seq_len: Window length (default: the run's ``data.seq_len``).
        split: ``"val"``, ``"train"`` or ``"all"`` (both splits, train then validation).
        max_windows: Score at most this many windows (``None``: as described above).
        tokenizer: The model's tokenizer (:mod:`mla.tokenizer`); ``None`` is the byte one.

    Raises:
        ConfigError: bad ``split`` or ``max_windows``; DataError: unreadable data or too short.
    """
    if split not in ("val", "train", "all"):
        raise ConfigError(f"--split={split!r} must be 'val', 'train' or 'all'")
    if max_windows is not None and max_windows < 1:
        raise ConfigError(f"--max-windows={max_windows} must be >= 1")
    data = dict(DEFAULT_DATA, **((job or {}).get("data") or {}))
    train = (job or {}).get("train") or {}
    own = data_path is None
    path = data["path"] if own else data_path
    seq = int(seq_len or data["seq_len"])
    corpus = load_corpus(path, float(data["val_fraction"]), tokenizer)
    tokens = {
        "val": corpus.val,
        "train": corpus.train,
        "all": np.concatenate([corpus.train, corpus.val]),
    }[split]
    if (
        own
        and split == "val"
        and seq_len in (None, data["seq_len"])
        and "seed" in train
        and max_windows is None
    ):
        batches = WindowBatches(tokens, seq, int(train["seed"]) + 1)
        gb = int(train["global_batch"])
        n = max(1, min(int(train["eval_batches"]), batches.n_windows // gb)) * gb
        x, y = batches.windows(np.arange(n))
        repeats = (
            f" (the split holds only {batches.n_windows} distinct windows, so the run and this "
            "score repeat some; a longer validation split, a larger data.val_fraction, gives a "
            "less noisy loss)"
            if n > batches.n_windows
            else ""
        )
        return EvalData(
            x,
            y,
            f"{corpus.source}, validation split: the {n} windows of {seq} tokens the run "
            f"evaluated on{repeats}",
            _target_bytes(y, tokenizer),
        )
    batches = WindowBatches(tokens, seq, seed=0, shuffle=False)
    n = batches.n_windows if max_windows is None else min(max_windows, batches.n_windows)
    x, y = batches.windows(np.arange(n))
    return EvalData(
        x,
        y,
        f"{corpus.source}, {split} split: {n} windows of {seq} tokens",
        _target_bytes(y, tokenizer),
    )


def _target_bytes(targets: np.ndarray, tokenizer) -> int | None:
    """UTF-8 bytes of the target tokens (``None`` for the byte tokenizer: one each)."""
    if tokenizer is None or tokenizer.kind == "byte":
        return None
    return len(tokenizer.token_bytes(targets.ravel().tolist()))


@torch.no_grad()
def evaluate(
    model: MLATransformer | Callable[[torch.Tensor], Any],
    data: EvalData,
    batch_size: int = 8,
    progress=None,
) -> dict:
    """Mean next-token cross-entropy of ``model`` over ``data``.

    Args:
        model: The torch model (switched to eval mode), or any callable mapping ``(batch, seq)``
            int64 tokens to ``(batch, seq, vocab)`` logits (an ONNX Runtime model,
            :class:`mla.compress.onnx_export.OnnxLM`; run on the CPU).
        data: Windows to score.
        batch_size: Windows per forward pass.
        progress: Optional ``callable(done, total)``.

    Returns:
        ``{"loss", "perplexity", "bits_per_byte", "tokens", "windows", "seq_len"}``; loss in nats.
    """
    device = torch.device("cpu")
    if isinstance(model, torch.nn.Module):
        model.eval()
        device = next(model.parameters()).device
    total, count = 0.0, 0
    n = len(data.inputs)
    for start in range(0, n, batch_size):
        x = torch.from_numpy(data.inputs[start : start + batch_size]).to(device)
        y = torch.from_numpy(data.targets[start : start + batch_size]).to(device)
        logits = torch.as_tensor(model(x)).float()
        total += float(F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum").double())
        count += y.numel()
        if progress is not None:
            progress(min(start + batch_size, n), n)
    loss = total / count
    n_bytes = data.target_bytes or count
    return {
        "loss": loss,
        "perplexity": math.exp(loss),
        "bits_per_byte": total / (math.log(2) * n_bytes),
        "tokens": count,
        "windows": n,
        "seq_len": int(data.inputs.shape[1]),
    }
