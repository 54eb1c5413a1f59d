"""Latency on this machine for ``mla compress``: timing, the deployed ONNX file of a shape, and
the empty model (embedding + tied head, no block) that bounds every shape's latency from below.

Every time is the minimum over a few calls after one warm-up (wall clock; other processes on a
shared machine only ever add time, so the minimum is the least noisy estimate).
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mla.compress.onnx_export import OnnxLM, export_onnx, quantize_int8
from mla.config import ModelConfig
from mla.model import MLATransformer, RMSNorm


def latency_ms(fn: Callable[[Any], Any], tokens: Any, rounds: int = 5) -> float:
    """Minimum wall time of ``fn(tokens)`` over ``rounds`` calls after one warm-up, in ms."""
    fn(tokens)
    best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        fn(tokens)
        best = min(best, time.perf_counter() - t)
    return best * 1e3


def deploy_onnx(model: MLATransformer, dst: Path, seq: int, precision: str) -> Path:
    """Export ``model`` to ``dst`` (ONNX at ``seq`` tokens), INT8 unless ``precision="fp32"``."""
    if precision == "fp32":
        return export_onnx(model, dst, seq)
    fp32 = export_onnx(model, dst.with_name(f".fp32-{dst.name}"), seq)
    try:
        return quantize_int8(fp32, dst)
    finally:
        fp32.unlink(missing_ok=True)


class _EmptyModel(nn.Module):
    """Embedding -> final norm -> tied head of a model: what no pruning removes."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(self.norm(self.tok_emb(tokens)), self.tok_emb.weight)


def empty_model_latency_ms(
    cfg: ModelConfig, seq: int, batch: int, precision: str, threads: int
) -> float:
    """Latency of the empty model of ``cfg`` (no block) deployed like ``mla compress`` deploys:
    ONNX at ``seq`` tokens, ONNX Runtime (INT8 unless ``precision="fp32"``), ``threads``
    threads; minimum over 5 calls of a ``(batch, seq)`` window, in ms. A lower bound of every
    pruned shape's latency (the same graph with blocks added)."""
    with tempfile.TemporaryDirectory(prefix="mla-empty-") as tmp:
        path = deploy_onnx(_EmptyModel(cfg), Path(tmp) / "empty.onnx", seq, precision)  # type: ignore[arg-type]
        lm = OnnxLM(path, threads)
        return latency_ms(lm, np.zeros((batch, seq), dtype=np.int64))


def shape_latency_ms(
    model: MLATransformer, seq: int, batch: int, precision: str, threads: int, folder: Path
) -> float:
    """Latency of ``model`` deployed as ``mla compress`` deploys it (ONNX at ``seq`` tokens, INT8
    unless ``precision="fp32"``), for one ``(batch, seq)`` window, in ms; the probe file is
    written in ``folder`` and removed."""
    path = deploy_onnx(model, folder / ".probe.onnx", seq, precision)
    try:
        return latency_ms(OnnxLM(path, threads), np.zeros((batch, seq), dtype=np.int64))
    finally:
        path.unlink(missing_ok=True)
