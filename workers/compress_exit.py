"""The early-exit stage of ``mla compress`` and the saved exit configuration it reloads from.

Runs after recovery (distillation) on the torch student, before QAT and the export:

1. **Train the exits** (``exit_steps``): distillation from the teacher with the exit loss of
   :func:`mla.compress.early_exit.early_exit_loss` (CALM's depth-weighted KL over every exit and
   the final layer, Schuster et al. 2022, Sec. 5), **jointly**: every weight of the student
   trains. The exits share the model's final norm and tied head (LayerSkip, Elhoushi et al.
   2024, arXiv:2404.16710, Sec. 3), so there is no exit-only parameter to train with the body
   frozen; LayerSkip and CALM both train the whole model with the early-exit loss. The final
   layer keeps the largest weight (``L / sum``), so this is still distillation of the full
   model, and the deployed full-depth file is verified after it (its cost is in the report).
2. **Calibrate** the threshold on the validation windows
   (:func:`mla.compress.early_exit.calibrate_threshold`, CALM Sec. 3.2): the lowest grid
   threshold whose loss stays within ``tolerance`` nats per token of the same model at full
   depth. Done on the final torch weights (after QAT, if any), the ones saved.
3. **Measure**: routing on the validation windows (fraction of tokens per exit and at full
   depth, mean layers, block compute saved) and greedy KV-cache decoding at batch 1 with and
   without exits (tokens/s, minimum over interleaved rounds).

The configuration is saved as ``pruned/early_exit.json`` (:func:`save_exit_config`), inside the
staged output folder, so it is written atomically with the rest. The ONNX file stays the
full-depth graph: a per-token exit is data-dependent control flow inside one decoding step,
which a static ONNX graph of the full window does not express; early exit is a torch-path
feature (``mla generate`` / ``mla eval`` on ``OUT/pruned``).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from mla.compress.distill import distill
from mla.compress.early_exit import (
    ExitStats,
    calibrate_threshold,
    check_exits,
    early_exit_forward,
    early_exit_loss,
    generate_early_exit,
)
from mla.generate import generate
from mla.model import MLATransformer
from mla.sampling import SamplingConfig
from orchestrator.contract.errors import CheckpointError, ConfigError
from workers.evaluation import EvalData, evaluate

EXIT_FILE = "early_exit.json"
EXIT_FORMAT = "mla-early-exit-v1"
#: Exit tolerance without ``--exit-tolerance`` or ``--max-loss-increase``, nats per token
#: (the 0.015-0.025 range measured in ../shared/anchors/compression/REPORT.md, Sec. 6).
DEFAULT_TOLERANCE = 0.02
#: New tokens of the decoding measurement, and its rounds.
DECODE_TOKENS = 32
DECODE_ROUNDS = 3


def parse_exits(text: str) -> tuple[int, ...]:
    """``"2,3"`` -> ``(2, 3)``.

    Raises:
        ConfigError: an item is not an integer (the message names ``--early-exit``).
    """
    items = [t.strip() for t in text.split(",")]
    try:
        return tuple(int(t) for t in items)
    except ValueError:
        raise ConfigError(
            f"--early-exit={text!r} must be comma-separated layer numbers (blocks run before the "
            "exit), e.g. --early-exit 2,3"
        ) from None


def check_exit_settings(exits: tuple[int, ...], exit_steps: int, tolerance: float | None) -> None:
    """Refuse ``--exit-steps`` / ``--exit-tolerance`` values before loading the model.

    Raises:
        ConfigError: a negative step count, a negative or non-finite tolerance, or exit options
            without ``--early-exit``.
    """
    if exit_steps < 0:
        raise ConfigError(f"--exit-steps={exit_steps} must be >= 0")
    if tolerance is not None and not (tolerance >= 0 and math.isfinite(tolerance)):
        raise ConfigError(f"--exit-tolerance={tolerance:g} must be >= 0 nats per token, e.g. 0.02")
    if not exits and tolerance is not None:
        raise ConfigError("--exit-tolerance needs --early-exit LAYERS, e.g. --early-exit 2,3")


def check_exits_against_model(exits: tuple[int, ...], n_layers: int) -> None:
    """:func:`mla.compress.early_exit.check_exits` as a CLI error naming ``--early-exit``.

    Raises:
        ConfigError: an exit out of ``[1, n_layers - 1]``, repeated, unordered, or the last layer.
    """
    if n_layers < 2:
        raise ConfigError(
            f"--early-exit={','.join(map(str, exits))}: no early exit is possible in a model of "
            f"{n_layers} block (an exit sits after a block before the last); drop --early-exit "
            "or keep at least 2 blocks (--layers-keep)"
        )
    try:
        check_exits(n_layers, list(exits))
    except ValueError as exc:
        raise ConfigError(
            f"--early-exit={','.join(map(str, exits))}: {exc}; e.g. --early-exit "
            f"{','.join(map(str, range(max(1, n_layers // 2), n_layers)))}"
        ) from None


def exit_tolerance(asked: float | None, max_loss_increase: float | None, used: float) -> float:
    """The tolerance the threshold is calibrated to, in nats per token.

    ``asked`` when given; else what ``max_loss_increase`` leaves after compression (``used``:
    the student's full-depth loss increase over the teacher), so the torch path with exits stays
    within ``--max-loss-increase`` of the original; else :data:`DEFAULT_TOLERANCE`.

    Example: ``--max-loss-increase 0.10`` and a student +0.07 over the teacher: 0.03.
    """
    if asked is not None:
        return asked
    if max_loss_increase is not None:
        return max(0.0, max_loss_increase - used)
    return DEFAULT_TOLERANCE


def train_exits(student, teacher, exits, batches, steps: int, lr: float, progress=None) -> list:
    """``steps`` of joint exit-loss distillation of ``student`` (in place; see the module
    docstring for why jointly). Returns each step's loss."""
    return distill(
        student, teacher, batches, steps, lr, progress=progress, loss_fn=early_exit_loss(exits)
    )


@torch.no_grad()
def routed_eval(
    model: MLATransformer, data: EvalData, exits: list[int], threshold: float, batch_size: int = 8
) -> dict[str, Any]:
    """Validation loss with each token's logits from its exit, and where tokens left.

    Returns:
        ``{"val_loss", "val_loss_full", "exit_fractions" {layer: fraction, L included},
        "mean_layers", "compute_saved", "tokens"}``; losses are mean nats per token.
    """
    model.eval()
    total = full = 0.0
    layers = []
    for i in range(0, len(data.inputs), batch_size):
        x = torch.from_numpy(data.inputs[i : i + batch_size])
        y = torch.from_numpy(data.targets[i : i + batch_size]).flatten()
        logits, stats = early_exit_forward(model, x, exits, threshold)
        total += float(F.cross_entropy(logits.flatten(0, 1), y, reduction="sum").double())
        full += float(F.cross_entropy(model(x).flatten(0, 1), y, reduction="sum").double())
        layers.append(stats.layers.flatten())
    st = ExitStats(torch.cat(layers), len(model.blocks), tuple(exits))
    n = st.layers.numel()
    return {
        "val_loss": total / n,
        "val_loss_full": full / n,
        "exit_fractions": {str(k): v for k, v in st.fractions().items()},
        "mean_layers": st.mean_layers,
        "compute_saved": st.compute_saved,
        "tokens": n,
    }


def decode_speed(
    model: MLATransformer, prompt: list[int], exits: list[int], threshold: float
) -> dict[str, Any]:
    """Greedy KV-cache decoding of :data:`DECODE_TOKENS` tokens at batch 1: with exits, without
    (:func:`mla.generate.generate`, the path ``--no-early-exit`` takes) and through the exit
    code at threshold 1.0 (same loop, no exit taken: isolates what the exits themselves save),
    interleaved; minimum wall time over :data:`DECODE_ROUNDS` rounds after a warm-up.

    Returns:
        ``{"new_tokens", "tokens_per_s_full", "tokens_per_s_exit", "tokens_per_s_threshold_1",
        "speedup" (exit vs full), "speedup_vs_threshold_1", "mean_layers", "exit_fractions",
        "same_tokens"}`` (``same_tokens``: with and without exits decoded the same ids).
    """
    greedy = SamplingConfig(temperature=0.0)
    n = min(DECODE_TOKENS, model.cfg.max_seq_len - len(prompt) + 1)
    runs = {
        "full": lambda: (generate(model, [prompt], n, greedy), None),
        "exit": lambda: generate_early_exit(model, [prompt], n, greedy, exits, threshold),
        "one": lambda: generate_early_exit(model, [prompt], n, greedy, exits, 1.0),
    }
    best = dict.fromkeys(runs, math.inf)
    outs: dict[str, Any] = {}
    for r in range(DECODE_ROUNDS + 1):  # round 0 warms up
        for name, fn in runs.items():
            t = time.perf_counter()
            outs[name] = fn()
            if r:
                best[name] = min(best[name], time.perf_counter() - t)
    toks, stats = outs["exit"]
    return {
        "new_tokens": n,
        "tokens_per_s_full": n / best["full"],
        "tokens_per_s_exit": n / best["exit"],
        "tokens_per_s_threshold_1": n / best["one"],
        "speedup": best["full"] / best["exit"],
        "speedup_vs_threshold_1": best["one"] / best["exit"],
        "mean_layers": stats.mean_layers,
        "exit_fractions": {str(k): v for k, v in stats.fractions().items()},
        "same_tokens": toks == outs["full"][0],
    }


@dataclass
class ExitStage:
    """The stage's settings and what it measured (filled by :meth:`train` and :meth:`finish`).

    Attributes:
        exits: Exit layers.
        steps: Exit-loss distillation steps.
        lr: Their peak learning rate.
        tolerance: ``--exit-tolerance`` (``None``: derived, :func:`exit_tolerance`).
        max_loss_increase: ``--max-loss-increase`` (for the derived tolerance).
    """

    exits: tuple[int, ...]
    steps: int
    lr: float
    tolerance: float | None
    max_loss_increase: float | None
    row: dict | None = None

    def train(self, student, teacher, batches, val_loss_fn, stages) -> float:
        """Train the exits jointly; returns the student's full-depth validation loss after."""
        before = val_loss_fn(student)
        step = stages.stage(f"early exit: train exits {list(self.exits)}", max(1, self.steps))
        losses = train_exits(
            student,
            teacher,
            list(self.exits),
            batches,
            self.steps,
            self.lr,
            progress=lambda i, loss: step(i, f"exit loss {loss:.4f}"),
        )
        step(max(1, self.steps))
        after = val_loss_fn(student)
        self.row = {
            "exits": list(self.exits),
            "exit_steps": self.steps,
            "training": "joint: every student weight, exit loss = CALM depth-weighted KL to the "
            "teacher over the exits and the final layer (shared final norm + tied head)",
            "full_val_loss_before_exit_training": before,
            "full_val_loss_after_exit_training": after,
            "final_exit_loss": losses[-1] if losses else None,
        }
        return after

    def finish(self, student, val: EvalData, teacher_loss: float, folder: Path, stages) -> dict:
        """Calibrate, measure and save the configuration into ``folder`` (``pruned/``)."""
        exits = list(self.exits)
        step = stages.stage("early exit: calibrate + decode", 3)
        full = evaluate(student, val, batch_size=8)["loss"]
        tol = exit_tolerance(self.tolerance, self.max_loss_increase, full - teacher_loss)
        batches = [
            (torch.from_numpy(val.inputs[i : i + 8]), torch.from_numpy(val.targets[i : i + 8]))
            for i in range(0, len(val.inputs), 8)
        ]
        threshold, grid = calibrate_threshold(student, batches, exits, tol)
        step(1, f"threshold {threshold:g}")
        routed = routed_eval(student, val, exits, threshold)
        step(2)
        prompt = np.asarray(val.inputs[0, :32]).tolist()
        decode = decode_speed(student, prompt, exits, threshold)
        step(3, f"{decode['speedup']:.2f}x decode")
        row = dict(self.row or {"exits": exits, "exit_steps": 0})
        row.update(
            tolerance=tol,
            tolerance_source="--exit-tolerance"
            if self.tolerance is not None
            else ("--max-loss-increase" if self.max_loss_increase is not None else "default"),
            threshold=threshold,
            calibration=grid,
            calibrated_on=val.description,
            exit_fractions=routed["exit_fractions"],
            mean_layers=routed["mean_layers"],
            compute_saved=routed["compute_saved"],
            val_loss_with_exits=routed["val_loss"],
            val_loss_without_exits=routed["val_loss_full"],
            loss_increase=routed["val_loss"] - routed["val_loss_full"],
            decode_batch1=decode,
            deployed_onnx="full depth: early exit is a torch-path feature (per-token "
            "data-dependent control flow is not in the static ONNX graph)",
            file=f"pruned/{EXIT_FILE}",
        )
        save_exit_config(folder, exits, threshold, len(student.blocks), tol)
        return row


def save_exit_config(
    folder: Path, exits: list[int], threshold: float, n_layers: int, tolerance: float
) -> Path:
    """Write ``folder/early_exit.json`` (inside a staged folder: atomic with it)."""
    path = Path(folder) / EXIT_FILE
    doc = {
        "format": EXIT_FORMAT,
        "exits": list(exits),
        "threshold": threshold,
        "n_layers": n_layers,
        "tolerance": tolerance,
        "confidence": "largest softmax probability of the shared head (CALM softmax response)",
    }
    path.write_text(json.dumps(doc, indent=2) + "\n")
    return path


def load_exit_config(folder: Path | str, n_layers: int) -> dict | None:
    """``folder/early_exit.json`` as ``{"exits", "threshold", ...}``, or ``None`` if absent.

    Raises:
        CheckpointError: the file is unreadable or does not fit the model.
    """
    path = Path(folder) / EXIT_FILE
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text())
        if doc.get("format") != EXIT_FORMAT:
            raise ValueError(f"format {doc.get('format')!r} is not {EXIT_FORMAT!r}")
        check_exits(n_layers, list(doc["exits"]), float(doc["threshold"]))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    return doc


def exit_stage_of(s: Any) -> ExitStage | None:
    """The stage for :class:`workers.compress.CompressSettings` ``s`` (``None``: no
    ``--early-exit``)."""
    if not s.early_exit:
        return None
    return ExitStage(tuple(s.early_exit), s.exit_steps, s.lr, s.exit_tolerance, s.max_loss_increase)
