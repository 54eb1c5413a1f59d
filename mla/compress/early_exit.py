"""Early-exit routing: a token leaves the stack after a chosen layer once the model is confident.

Exit head: the model's own final norm and tied output head applied to the residual stream after
block ``i`` (``head(norm(x_i))``), shared by every exit (LayerSkip, Elhoushi et al. 2024, Sec. 3:
one shared LM head for all exits; no new parameters). Confidence: the largest softmax
probability of the exit's next-token distribution (CALM, Schuster et al. 2022, Sec. 3.5,
"softmax response"). A token exits at the first exit layer whose confidence is ``>= threshold``;
``threshold = 1.0`` turns exits off (a float32 softmax can round to exactly 1.0, so 1.0 is
treated as "never" rather than trusted), so the full model is reproduced bit for bit.

Two uses:

* :func:`early_exit_forward`: full-sequence scoring. Every layer runs (a parallel pass cannot
  stop per token), each token takes its logits from its exit; the layers it *would* have used
  give the compute saved (the "oracle" figure of ``../shared/anchors/compression/REPORT.md``,
  Sec. 3e).
* :func:`generate_early_exit` / :func:`decode_step_early_exit`: incremental decoding with the KV
  cache (:mod:`mla.decoding`), where exiting saves work. A token that exits after layer ``i``
  skips the MLP of every later layer; those layers still run their attention on the exited
  hidden state, which writes this position's keys and values into their caches (CALM's state
  propagation, Sec. 4.1: later tokens attend to the copied state). In a batch, a layer's MLP is
  skipped once every row has exited; per-row layer counts are reported either way.

Training the exits: :func:`early_exit_loss` is the distillation loss (:mod:`mla.compress.distill`)
summed over every exit and the final layer with CALM's weights ``w_i = i / sum_j j`` (Sec. 5,
deeper exits weigh more), passed to :func:`mla.compress.distill.distill` as its ``loss_fn``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from mla.compress.distill import distillation_loss
from mla.decoding import DecodeState, _attention_step, blocks_of, logits_at_last, prefill
from mla.generate import check_prompts
from mla.kv_cache import StepPositions
from mla.model import MLATransformer
from mla.sampling import SamplingConfig, make_generator, sample_next


def check_exits(n_layers: int, exits: list[int] | tuple[int, ...], threshold: float = 1.0) -> None:
    """Refuse exit layers or thresholds that mean nothing.

    Args:
        n_layers: Blocks L of the model.
        exits: Exit layers, counted in blocks run (``1`` = after the first block); strictly
            increasing, each in ``[1, L - 1]`` (an exit after block L is the model itself).
        threshold: Confidence threshold in ``(0, 1]``.

    Raises:
        ValueError: a bad value; the message names it and the allowed range.
    """
    if not exits:
        raise ValueError(f"exits is empty: choose exit layers in [1, {n_layers - 1}]")
    if list(exits) != sorted(set(exits)) or exits[0] < 1 or exits[-1] > n_layers - 1:
        raise ValueError(
            f"exits={list(exits)} must be strictly increasing layers in [1, {n_layers - 1}] "
            f"(the model has {n_layers} blocks; an exit after the last is the full model)"
        )
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold={threshold} must be in (0, 1]; 1.0 turns exits off")


def exit_logits(
    model: MLATransformer, tokens: torch.Tensor, exits: list[int]
) -> list[torch.Tensor]:
    """Logits of every exit and of the full model in one pass.

    Args:
        model: The model.
        tokens: ``(batch, seq)`` int64.
        exits: Exit layers (:func:`check_exits`).

    Returns:
        ``len(exits) + 1`` tensors ``(batch, seq, vocab)``: ``head(norm(x_i))`` after each exit
        layer, then the final logits (equal to ``model(tokens)``).
    """
    check_exits(len(model.blocks), exits)
    x = model.tok_emb(tokens)
    out = []
    for i, block in enumerate(model.blocks, start=1):
        x = block(x)
        if i in exits:
            out.append(model.head(model.norm(x)))
    out.append(model.head(model.norm(x)))
    return out


def confidence(logits: torch.Tensor) -> torch.Tensor:
    """Largest softmax probability over the vocabulary: ``(..., vocab)`` -> ``(...)``
    (CALM's softmax response, Schuster et al. 2022, Sec. 3.5)."""
    return torch.softmax(logits.float(), dim=-1).amax(-1)


@dataclass(frozen=True)
class ExitStats:
    """Where tokens left the stack.

    Attributes:
        layers: Layers each token used, ``(batch, seq)`` or ``(tokens,)`` int64.
        n_layers: Blocks L of the model.
        exits: Exit layers.
    """

    layers: torch.Tensor
    n_layers: int
    exits: tuple[int, ...]

    def fractions(self) -> dict[int, float]:
        """Fraction of tokens that used each exit layer (``L`` = the full model)."""
        n = max(1, self.layers.numel())
        return {e: float((self.layers == e).sum()) / n for e in (*self.exits, self.n_layers)}

    @property
    def mean_layers(self) -> float:
        """Mean layers used per token."""
        return float(self.layers.float().mean()) if self.layers.numel() else float(self.n_layers)

    @property
    def compute_saved(self) -> float:
        """Fraction of block compute not spent: ``1 - mean_layers / L``."""
        return 1.0 - self.mean_layers / self.n_layers


@torch.no_grad()
def early_exit_forward(
    model: MLATransformer, tokens: torch.Tensor, exits: list[int], threshold: float
) -> tuple[torch.Tensor, ExitStats]:
    """Full-sequence logits with per-token early exit (every layer still runs).

    Args:
        model: The model (eval mode).
        tokens: ``(batch, seq)`` int64.
        exits: Exit layers (:func:`check_exits`).
        threshold: Confidence threshold in ``(0, 1]``; ``1.0`` returns ``model(tokens)``.

    Returns:
        ``(logits (batch, seq, vocab), stats)``: each token's logits from its exit.
    """
    check_exits(len(model.blocks), exits, threshold)
    return _route(exit_logits(model, tokens, exits), exits, threshold, len(model.blocks))


def _route(
    levels: list[torch.Tensor], exits: list[int], threshold: float, n: int
) -> tuple[torch.Tensor, ExitStats]:
    """Each token's logits from the first exit of ``levels`` (:func:`exit_logits`) confident
    enough, else from the last; ``n`` is the model's block count."""
    logits = levels[-1].clone()
    shape = logits.shape[:-1]
    layers = torch.full(shape, n, dtype=torch.long)
    done = torch.zeros(shape, dtype=torch.bool)
    if threshold < 1.0:
        for e, lg in zip(exits, levels[:-1], strict=True):
            now = ~done & (confidence(lg) >= threshold)
            logits[now] = lg[now]
            layers[now] = e
            done |= now
    return logits, ExitStats(layers, n, tuple(exits))


@torch.no_grad()
def calibrate_threshold(
    model: MLATransformer,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    exits: list[int],
    tolerance: float,
    thresholds: tuple[float, ...] = (0.99, 0.95, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3),
) -> tuple[float, list[dict[str, Any]]]:
    """The lowest threshold whose validation loss stays within ``tolerance`` of the full model.

    CALM (Schuster et al. 2022, Sec. 3.2) calibrates the exit threshold on held-out data so the
    early-exit model stays within a quality tolerance of the full one; here the measure is the
    mean next-token cross-entropy, scanned over a grid (loss need not fall monotonically with the
    threshold, so every grid point is scored and the lowest one within tolerance wins).

    Args:
        model: The model (eval mode).
        batches: Held-out ``(inputs, targets)`` pairs, ``(batch, seq)`` int64 each.
        exits: Exit layers (:func:`check_exits`).
        tolerance: Largest accepted loss increase, nats per token (``>= 0``).
        thresholds: Grid in ``(0, 1)``.

    Returns:
        ``(threshold, rows)``: the chosen threshold (``1.0``: no grid point is within tolerance,
        exits off) and per threshold (1.0 first) ``{"threshold", "val_loss", "loss_increase",
        "mean_layers", "compute_saved", "exit_fractions"}``.

    Raises:
        ValueError: ``tolerance < 0``, no batch, or a bad exit/threshold.
    """
    if not tolerance >= 0:
        raise ValueError(f"tolerance={tolerance} must be >= 0 nats per token")
    if not batches:
        raise ValueError("calibration needs at least one held-out batch")
    n = len(model.blocks)
    grid = (1.0, *thresholds)
    for t in grid:
        check_exits(n, exits, t)
    totals = {t: 0.0 for t in grid}
    layers: dict[float, list[torch.Tensor]] = {t: [] for t in grid}
    count = 0
    for x, y in batches:
        levels = exit_logits(model, x, exits)
        for t in grid:
            logits, stats = _route(levels, exits, t, n)
            totals[t] += float(
                torch.nn.functional.cross_entropy(
                    logits.flatten(0, 1).float(), y.flatten(), reduction="sum"
                )
            )
            layers[t].append(stats.layers.flatten())
        count += y.numel()
    full = totals[1.0] / count
    rows: list[dict[str, Any]] = []
    ok: list[float] = []
    for t in grid:
        st = ExitStats(torch.cat(layers[t]), n, tuple(exits))
        loss = totals[t] / count
        rows.append(
            {
                "threshold": t,
                "val_loss": loss,
                "loss_increase": loss - full,
                "mean_layers": st.mean_layers,
                "compute_saved": st.compute_saved,
                "exit_fractions": {str(k): v for k, v in st.fractions().items()},
            }
        )
        if loss - full <= tolerance:
            ok.append(t)
    return min(ok), rows


def early_exit_loss(exits: list[int]):
    """A ``loss_fn`` for :func:`mla.compress.distill.distill` that trains the exits.

    Loss: ``sum_i w_i * KL(teacher || exit_i)`` over the exits and the final layer, with
    ``w_i = i / sum_j j`` over those layers (CALM, Schuster et al. 2022, Sec. 5).

    Returns:
        ``loss_fn(student, inputs, targets, teacher_logits) -> (loss, final_logits)``.
    """

    def loss_fn(student: MLATransformer, x, _y, target):
        levels = exit_logits(student, x, exits)
        depth = [*exits, len(student.blocks)]
        total = float(sum(depth))
        loss = sum(
            (d / total) * distillation_loss(lg, target) for d, lg in zip(depth, levels, strict=True)
        )
        return loss, levels[-1]

    return loss_fn


@torch.no_grad()
def decode_step_early_exit(
    model: MLATransformer,
    tokens: torch.Tensor,
    state: DecodeState,
    exits: list[int],
    threshold: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`mla.decoding.decode_step` with early exit (all rows active).

    Args:
        model: The model that filled ``state``.
        tokens: ``(batch,)`` int64 ids placed at ``state.lengths`` (advanced in place).
        state: Decode state from :func:`mla.decoding.prefill`.
        exits: Exit layers (:func:`check_exits`).
        threshold: Confidence threshold in ``(0, 1]`` (``1.0``: the full model, bit for bit).

    Returns:
        ``(logits (batch, vocab), layers (batch,))``: each row's next-token logits from its exit
        and the layers whose MLP it ran.

    Raises:
        ValueError: a row already holds ``state.capacity`` tokens.
    """
    check_exits(len(model.blocks), exits, threshold)
    full = [n for n in state.lengths if n >= state.capacity]
    if full:
        raise ValueError(
            f"a row already holds {full[0]} tokens, the cache capacity {state.capacity}; "
            "generate fewer tokens"
        )
    b, n = tokens.shape[0], len(model.blocks)
    at = StepPositions.of(state.lengths, tokens.device)
    x = model.tok_emb(tokens.view(-1, 1))  # (b, 1, d)
    done = torch.zeros(b, dtype=torch.bool, device=x.device)
    layers = torch.full((b,), n, dtype=torch.long)
    out = torch.zeros(b, model.cfg.vocab_size, dtype=x.dtype, device=x.device)
    for i, (block, cache) in enumerate(zip(blocks_of(model), state.caches, strict=True), start=1):
        h = x + _attention_step(block.attn, block.attn_norm(x), cache, at)
        if bool(done.all()):
            continue  # every row has exited: only this layer's K/V of the copied state
        y = h + block.mlp_dropout(block.mlp(block.mlp_norm(h)))
        x = torch.where(done.view(-1, 1, 1), x, y)
        if i in exits and threshold < 1.0:  # 1.0: no token can exit, skip the exit head
            lg = model.head(model.norm(x))[:, 0]
            now = ~done & (confidence(lg) >= threshold)
            out[now] = lg[now]
            layers[now.cpu()] = i
            done |= now
    if not bool(done.all()):
        last = model.head(model.norm(x))[:, 0]
        out[~done] = last[~done]
    state.lengths = [m + 1 for m in state.lengths]
    return out, layers


@torch.no_grad()
def generate_early_exit(
    model: MLATransformer,
    prompts: list[list[int]],
    max_new_tokens: int,
    sampling: SamplingConfig,
    exits: list[int],
    threshold: float,
    on_tokens: Callable[[int, list[int | None]], None] | None = None,
) -> tuple[list[list[int]], ExitStats]:
    """:func:`mla.generate.generate` with early exit in every decode step.

    The prompt is prefilled by the full model (one parallel pass, nothing to skip), so the first
    new token of a row uses all ``L`` layers; every later token exits by :func:`decode_step_early_exit`.
    Every row gets ``min(max_new_tokens, max_seq_len - max prompt length + 1)`` tokens (rows
    advance together). ``on_tokens(step, tokens)`` is called after every step with each row's
    new token, as in :func:`mla.generate.generate` (for streaming).

    Returns:
        ``(new tokens per row, stats over every new token)``; ``stats.layers`` is
        ``(steps * batch,)``, step-major (row ``r`` of step ``s`` at ``s * batch + r``).

    Raises:
        ValueError: see :func:`mla.generate.check_prompts` and :func:`check_exits`.
    """
    cfg = model.cfg
    check_prompts(prompts, max_new_tokens, cfg.max_seq_len)
    check_exits(cfg.n_layers, exits, threshold)
    model.eval()
    lengths = [len(p) for p in prompts]
    steps = min(max_new_tokens, cfg.max_seq_len - max(lengths) + 1)
    out: list[list[int]] = [[] for _ in prompts]
    used: list[torch.Tensor] = []
    if steps <= 0:
        return out, ExitStats(torch.zeros(0, dtype=torch.long), cfg.n_layers, tuple(exits))
    device = model.tok_emb.weight.device
    padded = torch.zeros(len(prompts), max(lengths), dtype=torch.long)
    for i, p in enumerate(prompts):
        padded[i, : len(p)] = torch.tensor(p, dtype=torch.long)
    capacity = max(max(lengths), max(lengths) + steps - 1)
    state, logits = prefill(model, padded.to(device), lengths, capacity=capacity)
    generator = make_generator(sampling.seed, device)
    nxt = sample_next(logits_at_last(logits, state), sampling, generator)
    used.append(torch.full((len(prompts),), cfg.n_layers, dtype=torch.long))
    for step in range(steps):
        for row, tok in enumerate(nxt.tolist()):
            out[row].append(tok)
        if on_tokens is not None:
            on_tokens(step, nxt.tolist())
        if step + 1 == steps:
            break
        logits, layers = decode_step_early_exit(model, nxt, state, exits, threshold)
        used.append(layers)
        nxt = sample_next(logits, sampling, generator)
    return out, ExitStats(torch.cat(used), cfg.n_layers, tuple(exits))
