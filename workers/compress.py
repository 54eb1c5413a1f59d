"""``mla compress``: fit a trained model to a size budget and prove it on the deployed file.

Stages (each shown as a progress bar on stderr, each recorded in ``compress_report.json``):

1. **Teacher**: the trained model; its fp32 weight size, torch latency at batch 1 and 8 and
   validation loss, then its ONNX Runtime INT8 export (measured size on disk: the base of the
   size prediction).
2. **Calibrate**: activation importance of MLP neurons and GQA head groups on training windows
   (:mod:`mla.compress.importance`, Minitron).
3. **Candidates**: uniform shapes ``ffn keep x head-group keep`` (fractions
   :data:`FFN_KEEP` x :data:`GROUP_KEEP`, rounded to tensor-parallel multiples). Predicted size
   = measured teacher file - removed weights x bytes per weight (1 for INT8, 4 for fp32):
   pruning only removes MatMul weights, the graph stays the same. Shapes within the budget are
   ranked by validation loss with the removed units masked (no recovery; Minitron's
   lightweight search).
4. **Distil** the best ``candidates`` shapes (:mod:`mla.compress.distill`, forward KL to the
   teacher's logits, in process on this machine) and keep the one with the lowest loss
   (a distillation that raises the loss is dropped: the pruned weights are kept).
5. **Deploy + verify**: ONNX export, ONNX Runtime dynamic INT8, then on the deployed file: size
   on disk, latency at batch 1 and 8 (minimum over rounds, ``threads`` ONNX Runtime threads),
   validation loss. A verified size over budget tries the next smaller shape.

The output folder is written under a temporary name and renamed when complete: ``model.int8.onnx``
(or ``model.onnx`` with ``precision="fp32"``), ``pruned/`` (the pruned torch model,
:func:`mla.pretrained.save_pretrained`), ``job.json`` (the run's, so ``mla eval --onnx`` scores
the run's validation split) and ``compress_report.json``.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from mla.compress.distill import distill
from mla.compress.importance import Importance, measure_importance
from mla.compress.onnx_export import OnnxLM, export_onnx, onnx_size_bytes, quantize_int8
from mla.compress.prune import (
    PrunePlan,
    apply_pruning,
    masked,
    plan_pruning,
    pruned_config,
    shape_problems,
)
from mla.config import ModelConfig
from mla.flops import count_parameters
from mla.model import MLATransformer
from mla.pretrained import save_pretrained
from mla.staged_dir import staged_dir
from orchestrator.contract.errors import ConfigError
from workers.data import WindowBatches, load_corpus
from workers.evaluation import DEFAULT_DATA, EvalData, evaluate

#: Fractions of MLP neurons and of GQA head groups a candidate keeps.
FFN_KEEP = (1.0, 0.75, 0.5, 0.375, 0.25)
GROUP_KEEP = (1.0, 0.75, 0.5, 0.25)
MB = 1e6


@dataclass(frozen=True)
class CompressSettings:
    """What ``mla compress`` was asked (validated by :func:`check_settings`).

    Attributes:
        target_mb: Size budget of the deployed file, in MB (10^6 bytes).
        max_loss_increase: Largest accepted validation-loss increase over the teacher, in nats
            per token (``None``: no quality budget).
        precision: ``"int8"`` (ONNX Runtime dynamic INT8) or ``"fp32"``.
        steps: Distillation steps per distilled candidate.
        candidates: How many shapes within the budget are distilled.
        batch: Distillation micro-batch, in windows.
        lr: Distillation peak learning rate.
        calib_windows: Training windows for the importance scores.
        val_windows: Validation windows scored for every loss in the report.
        threads: ONNX Runtime / torch threads for latency and scoring.
        tp: Tensor-parallel degree the pruned model must still support.
        seed: Seed of the distillation data order.
    """

    target_mb: float
    max_loss_increase: float | None = None
    precision: str = "int8"
    steps: int = 100
    candidates: int = 2
    batch: int = 8
    lr: float = 1e-3
    calib_windows: int = 64
    val_windows: int = 64
    threads: int = 1
    tp: int = 1
    seed: int = 0


def check_settings(s: CompressSettings) -> None:
    """Refuse bad settings before any work.

    Raises:
        ConfigError: a value out of range (the message names the option, the value and the fix).
    """
    if not (s.target_mb > 0 and math.isfinite(s.target_mb)):
        raise ConfigError(f"--target-mb={s.target_mb:g} must be a positive size in MB, e.g. 10")
    if s.max_loss_increase is not None and not s.max_loss_increase >= 0:
        raise ConfigError(
            f"--max-loss-increase={s.max_loss_increase:g} must be >= 0 nats per token, e.g. 0.05"
        )
    if s.precision not in ("int8", "fp32"):
        raise ConfigError(f"--precision={s.precision!r} must be 'int8' or 'fp32'")
    for name in ("candidates", "batch", "calib_windows", "val_windows", "threads", "tp"):
        if getattr(s, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')}={getattr(s, name)} must be >= 1")
    if s.steps < 0:
        raise ConfigError(f"--steps={s.steps} must be >= 0")
    if not s.lr > 0:
        raise ConfigError(f"--lr={s.lr} must be > 0")


@dataclass(frozen=True)
class Candidate:
    """A pruning shape and what is known about it."""

    ffn_keep: int
    groups_keep: int
    params: int
    predicted_mb: float
    masked_val_loss: float | None = None

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def candidate_shapes(cfg: ModelConfig, tp: int) -> list[tuple[int, int]]:
    """Distinct ``(ffn_keep, groups_keep)`` shapes from :data:`FFN_KEEP` x :data:`GROUP_KEEP`
    that :func:`mla.compress.prune.shape_problems` accepts, largest first."""
    out = set()
    for f in FFN_KEEP:
        ffn = max(tp, int(round(cfg.ffn_hidden * f / tp)) * tp)
        for g in GROUP_KEEP:
            groups = max(tp, int(round(cfg.kv_heads * g / tp)) * tp)
            if not shape_problems(cfg, ffn, groups, tp):
                out.add((ffn, groups))
    return sorted(out, key=lambda s: -count_parameters(pruned_config(cfg, *s)))


def predicted_bytes(
    teacher_file_bytes: int, teacher: ModelConfig, cfg: ModelConfig, bpw: int
) -> int:
    """Deployed size of ``cfg``: the teacher's measured file minus the removed weights.

    Example: a teacher file of 20.3 MB, 19.1M parameters, pruned to 6.45M, INT8 (1 byte per
    weight): ``20.3 - 12.66 = 7.6 MB`` (measured 7.7 MB, ../shared/anchors/compression, 3c).
    """
    return teacher_file_bytes - (count_parameters(teacher) - count_parameters(cfg)) * bpw


class Stages:
    """Rich progress bars on stderr, one per stage."""

    def __init__(self, console: Console) -> None:
        self.progress = Progress(
            TextColumn("{task.description:<34}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[note]}"),
            TimeElapsedColumn(),
            console=console,
        )

    def stage(self, name: str, total: int) -> Callable[..., None]:
        task = self.progress.add_task(name, total=total, note="")

        def advance(done: int | None = None, note: str = "") -> None:
            if done is None:
                self.progress.advance(task)
            else:
                self.progress.update(task, completed=done)
            if note:
                self.progress.update(task, note=note)

        return advance


def latency_ms(fn: Callable[[Any], Any], tokens: Any, rounds: int = 5) -> float:
    """Minimum wall time of ``fn(tokens)`` over ``rounds`` calls after one warm-up, in ms."""
    fn(tokens)
    best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        fn(tokens)
        best = min(best, time.perf_counter() - t)
    return best * 1e3


def _torch_fn(model: MLATransformer) -> Callable[[torch.Tensor], Any]:
    def run(x):
        with torch.no_grad():
            return model(torch.as_tensor(x))

    return run


def _profile(fn, val: EvalData, seq: int, rounds: int) -> dict:
    x = val.inputs
    rows = {b: np.resize(x, (b, seq)) if len(x) < b else x[:b] for b in (1, 8)}
    loss = evaluate(fn, val, batch_size=8)["loss"]
    return {
        "latency_ms": {str(b): latency_ms(fn, r, rounds) for b, r in rows.items()},
        "val_loss": loss,
    }


def compress(
    teacher: MLATransformer,
    job: dict | None,
    settings: CompressSettings,
    out: Path,
    source: str,
    console: Console,
) -> dict:
    """Run the pipeline of the module docstring; write ``out`` atomically; return the report.

    Args:
        teacher: The trained model (eval mode, CPU, fp32).
        job: The run's ``job.json`` (data path, sequence length), or ``None`` for the defaults.
        settings: Validated settings.
        out: Output folder (must not exist).
        source: The path the teacher came from (for the report).
        console: Where progress goes (stderr).

    Returns:
        The report dict (also written as ``out/compress_report.json``); ``report["met"]`` says
        whether the size and loss budgets were met.
    """
    torch.set_num_threads(settings.threads)
    data = dict(DEFAULT_DATA, **((job or {}).get("data") or {}))
    seq = min(int(data["seq_len"]), teacher.cfg.max_seq_len)
    corpus = load_corpus(data["path"], float(data["val_fraction"]))
    train = WindowBatches(corpus.train, seq, seed=settings.seed)
    val_all = WindowBatches(corpus.val, seq, seed=0, shuffle=False)
    vx, vy = val_all.windows(np.arange(min(settings.val_windows, val_all.n_windows)))
    val = EvalData(vx, vy, f"{corpus.source}, validation split: {len(vx)} windows of {seq} tokens")
    bpw = 1 if settings.precision == "int8" else 4
    stages = Stages(console)
    with staged_dir(out, overwrite=True) as tmp:
        with stages.progress:
            report = _run(teacher, settings, seq, train, val, bpw, tmp, stages)
        report.update(source=source, data=val.description, settings=settings.__dict__)
        if job is not None:
            (tmp / "job.json").write_text(json.dumps(job, indent=2) + "\n")
        (tmp / "compress_report.json").write_text(json.dumps(report, indent=2) + "\n")
        for leftover in tmp.glob("teacher.*"):
            leftover.unlink()
    return report


def _run(teacher, s: CompressSettings, seq, train, val, bpw, tmp: Path, stages: Stages) -> dict:
    cfg = teacher.cfg
    rounds = 5
    step = stages.stage("teacher: torch fp32 latency + loss", 1)
    teacher_row = {
        "params": count_parameters(cfg),
        "size_mb": 4 * count_parameters(cfg) / MB,
        **_profile(_torch_fn(teacher), val, seq, rounds),
    }
    step(1)
    step = stages.stage(f"teacher: ONNX {s.precision} export", 1)
    teacher_file = deploy_onnx(teacher, tmp / "teacher.onnx", seq, s.precision)
    teacher_deployed = {"size_mb": onnx_size_bytes(teacher_file) / MB}
    teacher_deployed.update(_profile(OnnxLM(teacher_file, s.threads), val, seq, rounds))
    step(1)
    step = stages.stage("calibrate: importance", s.calib_windows)
    calib = _calibration(train, s.calib_windows, step)
    imp = measure_importance(teacher, calib)
    shapes = candidate_shapes(cfg, s.tp)
    fits = [
        Candidate(f, g, count_parameters(pruned_config(cfg, f, g)), p / MB)
        for f, g in shapes
        if (p := predicted_bytes(onnx_size_bytes(teacher_file), cfg, pruned_config(cfg, f, g), bpw))
        <= s.target_mb * MB
    ]
    step = stages.stage("candidates: loss with units masked", len(fits))
    ranked = _rank(teacher, imp, fits, val, s.tp, step)
    report: dict[str, Any] = {
        "teacher": teacher_row,
        f"teacher_onnx_{s.precision}": teacher_deployed,
        "candidates_considered": len(shapes),
        "candidates_within_budget": [c.to_dict() for c in ranked],
    }
    if not ranked:
        smallest = min(shapes, key=lambda sh: count_parameters(pruned_config(cfg, *sh)))
        best_mb = (
            predicted_bytes(onnx_size_bytes(teacher_file), cfg, pruned_config(cfg, *smallest), bpw)
            / MB
        )
        report["met"] = {"size": False, "loss": None}
        report["failure"] = (
            f"no pruning shape fits --target-mb {s.target_mb:g}: the smallest candidate "
            f"(ffn_keep {smallest[0]}, groups_keep {smallest[1]}) is predicted at {best_mb:.3f} MB; "
            f"raise --target-mb to at least {math.ceil(best_mb * 100) / 100:g}"
            + (" or use --precision int8" if s.precision == "fp32" else "")
        )
        return report
    return _distil_and_deploy(teacher, imp, ranked, s, seq, train, val, tmp, stages, report)


def _distil_and_deploy(teacher, imp, ranked, s, seq, train, val, tmp, stages, report) -> dict:
    rounds = 5
    tried = []
    for cand in ranked[: s.candidates]:
        plan = plan_pruning(imp, teacher.cfg, cand.ffn_keep, cand.groups_keep, s.tp)
        student = apply_pruning(teacher, plan)
        unpruned = (
            cand.ffn_keep == teacher.cfg.ffn_hidden and cand.groups_keep == teacher.cfg.kv_heads
        )
        steps = 0 if unpruned else s.steps
        step = stages.stage(f"distil ffn {cand.ffn_keep} groups {cand.groups_keep}", max(1, steps))
        losses = distill(
            student,
            teacher,
            _batches(train, s.batch, s.seed),
            steps,
            s.lr,
            progress=_kl_note(step),
        )
        step(max(1, steps))
        loss = evaluate(student, val, batch_size=8)["loss"]
        if cand.masked_val_loss is not None and loss > cand.masked_val_loss:
            # distillation made it worse (too few steps, too high a rate): keep the pruned
            # weights, which compute exactly the masked loss measured before
            student = apply_pruning(teacher, plan)
            loss, losses = evaluate(student, val, batch_size=8)["loss"], []
        tried.append((loss, cand, student, losses))
    loss, cand, student, losses = min(tried, key=lambda t: t[0])
    report["distilled"] = [
        {
            **c.to_dict(),
            "distill_steps_kept": len(ls),
            "distilled_val_loss": v,
            "final_kl": ls[-1] if ls else None,
        }
        for v, c, _, ls in tried
    ]
    step = stages.stage(f"deploy: ONNX {s.precision} + verify", 1)
    name = "model.int8.onnx" if s.precision == "int8" else "model.onnx"
    deployed = deploy_onnx(student, tmp / name, seq, s.precision)
    save_pretrained(
        student, tmp / "pruned", source={"compressed_from": str(report.get("source", ""))}
    )
    row = {
        **cand.to_dict(),
        "file": name,
        "size_mb": onnx_size_bytes(deployed) / MB,
        "torch_val_loss": loss,
        **_profile(OnnxLM(deployed, s.threads), val, seq, rounds),
    }
    step(1)
    t = report["teacher"]
    row["loss_increase"] = row["val_loss"] - t["val_loss"]
    row["size_ratio"] = t["size_mb"] / row["size_mb"]
    row["speedup"] = {b: t["latency_ms"][b] / row["latency_ms"][b] for b in row["latency_ms"]}
    report["deployed"] = row
    size_ok = row["size_mb"] <= s.target_mb
    loss_ok = None if s.max_loss_increase is None else row["loss_increase"] <= s.max_loss_increase
    report["met"] = {"size": size_ok, "loss": loss_ok}
    if not size_ok:
        report["failure"] = (
            f"the deployed file is {row['size_mb']:.3f} MB, over --target-mb {s.target_mb:g} "
            f"(predicted {cand.predicted_mb:.3f} MB); raise --target-mb"
        )
    elif loss_ok is False:
        report["failure"] = (
            f"validation loss rose by {row['loss_increase']:.4f} nats/token, over "
            f"--max-loss-increase {s.max_loss_increase:g}; raise --target-mb (less pruning), "
            "--steps (more distillation) or --max-loss-increase"
        )
    return report


def _kl_note(step: Callable[..., None]) -> Callable[[int, float], None]:
    def note(i: int, loss: float) -> None:
        step(i, f"KL {loss:.4f}")

    return note


def deploy_onnx(model: MLATransformer, dst: Path, seq: int, precision: str) -> Path:
    """Export ``model`` to ``dst`` (ONNX at ``seq`` tokens), INT8 unless ``precision="fp32"``."""
    if precision == "fp32":
        return export_onnx(model, dst, seq)
    fp32 = export_onnx(model, dst.with_name(f".fp32-{dst.name}"), seq)
    try:
        return quantize_int8(fp32, dst)
    finally:
        fp32.unlink(missing_ok=True)


def floor_bytes(cfg: ModelConfig, precision: str) -> int:
    """Bytes no pruning shape removes: the token embedding (stored twice in the ONNX graph,
    as the Gather table and as the tied head's MatMul weight) at the precision's bytes per
    weight, plus every RMSNorm in fp32. A target below it cannot be met.

    Example: vocab 256, d 128, 4 layers, INT8: ``2 * 256 * 128 + 4 * 128 * 9 = 70,144`` bytes.
    """
    bpw = 1 if precision == "int8" else 4
    return 2 * cfg.vocab_size * cfg.d_model * bpw + 4 * cfg.d_model * (2 * cfg.n_layers + 1)


def _calibration(train: WindowBatches, n: int, step) -> list[torch.Tensor]:
    x, _ = train.windows(np.arange(min(n, train.n_windows)))
    step(len(x))
    return [torch.from_numpy(x[i : i + 8]) for i in range(0, len(x), 8)]


def _rank(
    teacher, imp: Importance, fits: list[Candidate], val: EvalData, tp: int, step
) -> list[Candidate]:
    out = []
    for c in fits:
        plan: PrunePlan = plan_pruning(imp, teacher.cfg, c.ffn_keep, c.groups_keep, tp)
        with masked(teacher, plan):
            loss = evaluate(teacher, val, batch_size=8)["loss"]
        out.append(Candidate(c.ffn_keep, c.groups_keep, c.params, c.predicted_mb, loss))
        step()
    return sorted(out, key=_masked_loss)


def _masked_loss(c: Candidate) -> float:
    return float("inf") if c.masked_val_loss is None else c.masked_val_loss


def _batches(
    train: WindowBatches, batch: int, seed: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    start = train.n_windows // 2 + seed  # away from the calibration windows
    i = 0
    while True:
        x, y = train.windows(np.arange(start + i * batch, start + (i + 1) * batch))
        yield torch.from_numpy(x), torch.from_numpy(y)
        i += 1
