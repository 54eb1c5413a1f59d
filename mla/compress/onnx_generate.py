"""Text generation with an ONNX Runtime model (:class:`mla.compress.onnx_export.OnnxLM`).

The exported graph is the full-sequence forward at one fixed length S (no KV cache), so every
step runs the whole window: each row's tokens so far, right-padded with zeros to S, and the
logits at the row's last position choose its next token. Causal attention makes the padding
invisible to earlier positions, so greedy decoding reproduces :func:`mla.generate.generate`
(up to ONNX Runtime's float reordering); a step costs one S-token forward pass, so this is for
checking a deployed file, not for speed. A row stops when it would need a position past S.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from mla.generate import check_prompts
from mla.sampling import SamplingConfig, make_generator, sample_next


def generate_onnx(
    lm: Callable[[np.ndarray], np.ndarray],
    seq_len: int,
    prompts: list[list[int]],
    max_new_tokens: int,
    sampling: SamplingConfig,
    on_tokens: Callable[[int, list[int | None]], None] | None = None,
) -> list[list[int]]:
    """Continue each prompt by up to ``max_new_tokens`` sampled tokens.

    Args:
        lm: Maps ``(batch, seq_len)`` int64 tokens to ``(batch, seq_len, vocab)`` logits.
        seq_len: The window length S ``lm`` takes.
        prompts: Token ids per row, each non-empty and at most ``seq_len`` long.
        max_new_tokens: New tokens per row (>= 0); a row stops after ``seq_len - len + 1``.
        sampling: Temperature, top-k, top-p and seed (as :func:`mla.generate.generate`).
        on_tokens: Called after every step with the step index and each row's new token
            (``None`` for a row that has stopped).

    Returns:
        The new token ids of each row.

    Raises:
        ValueError: see :func:`mla.generate.check_prompts` (with ``seq_len`` as the limit).
    """
    check_prompts(prompts, max_new_tokens, seq_len)
    rows = [list(p) for p in prompts]
    budget = [min(max_new_tokens, seq_len - len(p) + 1) for p in prompts]
    out: list[list[int]] = [[] for _ in prompts]
    generator = make_generator(sampling.seed)
    for step in range(max(budget, default=0)):
        window = np.zeros((len(rows), seq_len), dtype=np.int64)
        for i, r in enumerate(rows):
            window[i, : len(r)] = r
        logits = torch.from_numpy(lm(window))
        last = logits[torch.arange(len(rows)), torch.tensor([len(r) - 1 for r in rows])]
        nxt = sample_next(last, sampling, generator).tolist()
        emitted: list[int | None] = [
            t if step < b else None for t, b in zip(nxt, budget, strict=True)
        ]
        for i, tok in enumerate(emitted):
            if tok is not None:
                out[i].append(tok)
                if len(rows[i]) < seq_len:
                    rows[i].append(tok)
        if on_tokens is not None:
            on_tokens(step, emitted)
    return out
