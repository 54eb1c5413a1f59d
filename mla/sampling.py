"""Next-token sampling: temperature, top-k and top-p (nucleus), seeded and reproducible.

As in nanoGPT's ``generate`` and Hugging Face's logits warpers: logits are divided by the
temperature, then restricted to the ``top_k`` largest (Fan et al. 2018) and to the smallest set
whose probability reaches ``top_p`` (nucleus sampling, Holtzman et al. 2020, Sec. 3.1), and a
token is drawn from the renormalised softmax with a seeded ``torch.Generator``. Temperature 0
means greedy decoding (argmax).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingConfig:
    """How the next token is chosen.

    Attributes:
        temperature: Divides the logits; 0 picks the argmax (greedy); must be >= 0.
        top_k: Keep only the k most likely tokens (``None``: all); must be >= 1.
        top_p: Keep the smallest set of tokens whose probability sum reaches p; in (0, 1].
        seed: Seed of the sampling generator (same seed, same prompt, same model: same tokens).
    """

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise ValueError("; ".join(problems))

    def problems(self) -> list[str]:
        """Reasons why the settings are invalid (empty when valid), each naming the option."""
        out = []
        if not self.temperature >= 0:
            out.append(f"--temperature={self.temperature} must be >= 0 (0 means greedy decoding)")
        if self.top_k is not None and self.top_k < 1:
            out.append(f"--top-k={self.top_k} must be >= 1 (omit it to keep every token)")
        if not 0 < self.top_p <= 1:
            out.append(f"--top-p={self.top_p} must be in (0, 1] (1 keeps every token)")
        return out


def filter_logits(logits: torch.Tensor, top_k: int | None, top_p: float) -> torch.Tensor:
    """Set to ``-inf`` the logits outside the top-k and outside the top-p nucleus.

    Args:
        logits: ``(batch, vocab)``.
        top_k: k, or ``None``.
        top_p: p in (0, 1]; the most likely token is always kept.

    Returns:
        ``(batch, vocab)`` filtered copy.
    """
    out = logits.clone()
    if top_k is not None and top_k < out.shape[-1]:
        kth = out.topk(top_k, dim=-1).values[..., -1:]
        out = out.masked_fill(out < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = out.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        before = probs.cumsum(dim=-1) - probs  # mass of the strictly more likely tokens
        drop_sorted = before >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        out = out.masked_fill(drop, float("-inf"))
    return out


def sample_next(
    logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None
) -> torch.Tensor:
    """Choose the next token of each row.

    Args:
        logits: ``(batch, vocab)`` next-token logits.
        cfg: Sampling settings.
        generator: Seeded generator on the logits' device (ignored when greedy).

    Returns:
        ``(batch,)`` int64 token ids.
    """
    if cfg.temperature == 0:
        return logits.argmax(dim=-1)
    scaled = filter_logits(logits.float() / cfg.temperature, cfg.top_k, cfg.top_p)
    probs = scaled.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def make_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A ``torch.Generator`` on ``device`` seeded with ``seed``."""
    return torch.Generator(device=device).manual_seed(int(seed))
