"""Model shapes for planning: parameter-count strings and the standard shape rules.

``model_from_params("70B")`` picks a dense transformer of about that size with the rules most
published shapes follow: head dimension 128 (GPT-3 Table 2.1 from 6.7B up, LLaMA), depth
``L ≈ d/128`` (LLaMA-1 7B/13B: 4096/32, 5120/40), SwiGLU width ``8d/3`` rounded up to a multiple
of 256 (Touvron et al. 2023), so a block holds ``≈ 12·d²`` parameters (Kaplan et al. 2020,
eq. 2.1 / Megatron SC21 eq. 2). Solving ``12·L·d² = N`` with ``L = d/128`` gives
``d = (128·N/12)^(1/3)``, rounded to a multiple of 1024 from d = 2048 up (so the head count is a
multiple of 8 and tensor parallelism up to 8 divides it) and of 128 below; then
``L = round((N - V·d)/(12·d²))``.
"""

from __future__ import annotations

import re

from mla.config import ModelConfig, _swiglu_hidden
from mla.flops import count_parameters
from orchestrator.contract.errors import PlanError

_SUFFIX = {"": 1.0, "k": 1e3, "m": 1e6, "b": 1e9, "t": 1e12}


def parse_count(text: str | int | float) -> float:
    """Parse ``"70B"``, ``"1.5t"``, ``"350M"`` or a plain number into a count.

    Raises:
        PlanError: the text is not a positive number with an optional k/M/B/T suffix.

    Example:
        >>> parse_count("70B")
        70000000000.0
    """
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kmbt]?)\s*", str(text).lower())
    if not match or float(match.group(1)) <= 0:
        raise PlanError(f"parameter count {text!r} is not a positive number like 70B, 1.5T or 350M")
    return float(match.group(1)) * _SUFFIX[match.group(2)]


def model_from_params(
    n_params: str | float, vocab_size: int = 32000, seq_len: int = 4096
) -> ModelConfig:
    """A dense transformer of about ``n_params`` parameters by the standard shape rules.

    Args:
        n_params: Target parameter count (number or ``"70B"``-style string).
        vocab_size: Vocabulary size (LLaMA's 32,000 by default).
        seq_len: Sequence length the model is sized for, in tokens.

    Returns:
        A :class:`ModelConfig` with ``attention="dense"``.

    Raises:
        PlanError: the count cannot be parsed.

    Example:
        70B → d = (128·70e9/12)^(1/3) = 9,072 → 9,216 (72 heads of 128),
        L = round((70e9 - 32000·9216)/(12·9216²)) = 68 layers, ffn 24,576: 69.6B parameters as
        :func:`mla.flops.count_parameters` counts them.
    """
    target = parse_count(n_params)
    width = (128 * target / 12) ** (1 / 3)
    step = 1024 if width >= 2048 else 128
    d_model = max(128, step * round(width / step))
    n_layers = max(1, round((target - vocab_size * d_model) / (12 * d_model**2)))
    return ModelConfig(
        vocab_size=vocab_size,
        d_model=d_model,
        n_layers=n_layers,
        n_heads=d_model // 128,
        ffn_hidden=_swiglu_hidden(d_model),
        max_seq_len=seq_len,
        attention="dense",
        local_window=min(1024, seq_len),
        global_k=min(256, seq_len),
    )


def _count(n: float) -> str:
    """``6.6e9`` → ``6.6B``, ``1.2e6`` → ``1.2M``, ``850e3`` → ``850k``, ``12`` → ``12``."""
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return f"{n:.0f}"


def describe_model(cfg: ModelConfig) -> str:
    """One-line summary, e.g. ``70.3B params, L=71 d=9088 H=71 kv=71 ffn=24320 V=32000 dense``."""
    attn = (
        cfg.attention
        if cfg.attention == "dense"
        else f"mla(w={cfg.local_window}, k={cfg.global_k})"
    )
    return (
        f"{_count(count_parameters(cfg))} params, L={cfg.n_layers} d={cfg.d_model} H={cfg.n_heads} "
        f"kv={cfg.kv_heads} ffn={cfg.ffn_hidden} V={cfg.vocab_size} {attn}"
    )
