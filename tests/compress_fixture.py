"""A tiny MLA model trained for a few seconds on the standard-library corpus (for the
compression tests: ONNX parity and quantisation are only meaningful on trained weights, since
random weights leave near-tied top-k block scores that flip under float reordering)."""

import numpy as np
import torch
import torch.nn.functional as F

from mla.config import ModelConfig
from mla.model import MLATransformer
from workers.data import WindowBatches, load_corpus

SHAPE = dict(
    vocab_size=256,
    d_model=32,
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,
    ffn_hidden=64,
    max_seq_len=64,
    local_window=8,
    global_k=8,
    block_size=8,
)


def corpus_windows(seq: int = 64) -> tuple[WindowBatches, WindowBatches]:
    """(train, val) window samplers over the default corpus."""
    corpus = load_corpus(None, 0.05)
    return WindowBatches(corpus.train, seq, seed=0), WindowBatches(corpus.val, seq, seed=1)


def train_tiny(steps: int = 150, seed: int = 0, **kw) -> MLATransformer:
    """A SHAPE model (``kw`` overrides) after ``steps`` AdamW steps of batch 8 x 64 bytes."""
    torch.manual_seed(seed)
    model = MLATransformer(ModelConfig(**{**SHAPE, **kw}))
    train, _ = corpus_windows(model.cfg.max_seq_len)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(steps):
        x, y = (torch.from_numpy(a) for a in train.windows(np.arange(step * 8, step * 8 + 8)))
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def val_batch(n: int = 8, seq: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    _, val = corpus_windows(seq)
    x, y = val.windows(np.arange(n))
    return torch.from_numpy(x), torch.from_numpy(y)
