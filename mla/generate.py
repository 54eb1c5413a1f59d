"""Text generation with the KV cache: one prefill pass over the prompts, then one decode step per
new token (nanoGPT's and Hugging Face's ``generate``, with a cache instead of re-running the
sequence).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from mla.decoding import decode_step, logits_at_last, prefill
from mla.model import MLATransformer
from mla.sampling import SamplingConfig, make_generator, sample_next


def check_prompts(prompts: list[list[int]], max_new_tokens: int, max_seq_len: int) -> None:
    """Refuse prompts the model cannot continue.

    Raises:
        ValueError: no prompt, an empty prompt, a prompt longer than ``max_seq_len`` (the
            rotary table and the cache end there), or ``max_new_tokens < 0``; the message names
            the prompt, its length and the fix.
    """
    if not prompts:
        raise ValueError("no prompt given; pass --prompt TEXT or --prompt-file FILE")
    if max_new_tokens < 0:
        raise ValueError(f"--max-new-tokens={max_new_tokens} must be >= 0")
    for i, p in enumerate(prompts):
        if not p:
            raise ValueError(
                f"prompt {i + 1} is empty; the model needs at least one token to continue"
            )
        if len(p) > max_seq_len:
            raise ValueError(
                f"prompt {i + 1} has {len(p)} tokens, more than the model's max_seq_len "
                f"({max_seq_len}); shorten it to at most {max_seq_len} tokens"
            )


@torch.no_grad()
def generate(
    model: MLATransformer,
    prompts: list[list[int]],
    max_new_tokens: int,
    sampling: SamplingConfig,
    on_tokens: Callable[[int, list[int | None]], None] | None = None,
) -> list[list[int]]:
    """Continue each prompt by up to ``max_new_tokens`` sampled tokens.

    A row stops early when its next token would need a position past the model's
    ``max_seq_len`` (at most ``max_seq_len - len(prompt) + 1`` new tokens); the others go on. The same model, prompts, settings and seed give the same tokens.

    Args:
        model: The model (switched to eval mode).
        prompts: Token ids per row, each non-empty and at most ``max_seq_len`` long.
        max_new_tokens: New tokens per row (>= 0).
        sampling: Temperature, top-k, top-p and seed.
        on_tokens: Called after every step with the step index and each row's new token
            (``None`` for a row that has stopped), for streaming.

    Returns:
        The new token ids of each row (prompts excluded).

    Raises:
        ValueError: see :func:`check_prompts`.
    """
    cfg = model.cfg
    check_prompts(prompts, max_new_tokens, cfg.max_seq_len)
    model.eval()
    device = model.tok_emb.weight.device
    lengths = [len(p) for p in prompts]
    budget = [min(max_new_tokens, cfg.max_seq_len - n + 1) for n in lengths]  # new tokens per row
    out: list[list[int]] = [[] for _ in prompts]
    if max(budget) == 0:
        return out
    padded = torch.zeros(len(prompts), max(lengths), dtype=torch.long)
    for i, p in enumerate(prompts):
        padded[i, : len(p)] = torch.tensor(p, dtype=torch.long)
    capacity = max(max(lengths), max(n + b - 1 for n, b in zip(lengths, budget, strict=False)))
    state, logits = prefill(model, padded.to(device), lengths, capacity=capacity)
    generator = make_generator(sampling.seed, device)
    nxt = sample_next(logits_at_last(logits, state), sampling, generator)
    for step in range(max(budget)):
        emitted: list[int | None] = [
            tok if step < b else None for tok, b in zip(nxt.tolist(), budget, strict=False)
        ]
        for row, tok in enumerate(emitted):
            if tok is not None:
                out[row].append(tok)
        if on_tokens is not None:
            on_tokens(step, emitted)
        active = [step + 1 < b for b in budget]
        if not any(active):
            break
        nxt = sample_next(decode_step(model, nxt, state, active), sampling, generator)
    return out
