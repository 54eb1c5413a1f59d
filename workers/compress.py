"""``mla compress``: fit a trained model to a size and/or latency budget and prove it on the
deployed file.

Stages (each shown as a progress bar on stderr, each recorded in ``compress_report.json``):

1. **Teacher**: the trained model; its fp32 weight size, torch latency at batch 1, 8 and the
   latency batch, validation loss; then its ONNX Runtime export (measured size on disk: the base
   of the size prediction).
2. **Calibrate**: activation importance of MLP neurons, GQA head groups, hidden channels and
   blocks (Block Influence) on training windows
   (:mod:`mla.compress.importance`, Minitron).
3. **Candidates**: uniform shapes ``ffn keep x head-group keep`` (fractions
   :data:`FFN_KEEP` x :data:`GROUP_KEEP`, rounded to tensor-parallel multiples; or the one
   shape forced by ``ffn_keep``/``groups_keep``/``hidden_keep``/``layers_keep``; with
   ``search_hidden_layers`` also each shape with 3/4 of the hidden channels and with one block
   fewer). Predicted size = measured teacher file - removed weights x bytes per weight (1 for
   INT8, 4 for fp32; norms fp32) - a removed block's share of the graph
   (:func:`predicted_bytes`). With a latency target, the shapes within the size budget are
   pruned, deployed and timed on this machine (:func:`_latency_fits`: the smallest first,
   which refuses an unreachable target at once, then from the least aggressive down until
   ``candidates`` shapes meet it). The shapes left are ranked by validation loss with the
   removed units masked (no recovery; Minitron's lightweight search).
4. **Distil** the best ``candidates`` shapes (:mod:`mla.compress.distill`, forward KL to the
   teacher's logits, in process on this machine) and keep the one with the lowest loss
   (a distillation that raises the loss is dropped: the pruned weights are kept).
   Then, with ``early_exit``, the exits are trained (:mod:`workers.compress_exit`).
5. **QAT** (``qat_steps > 0``, INT8 only): more distillation under torchao INT8 fake
   quantisation, converted back to plain modules (:mod:`mla.compress.qat`).
6. **Deploy + verify**: ONNX export, ONNX Runtime dynamic INT8, then on the deployed file: size
   on disk, latency (minimum over rounds, ``threads`` ONNX Runtime threads), validation loss.
   A budget the deployed file misses is reported (``met``, ``failure``), not retried.
   With ``early_exit``: the exit threshold is calibrated on the torch student and saved as
   ``pruned/early_exit.json`` (:mod:`workers.compress_exit`; the ONNX file stays full depth).

The output folder is written under a temporary name and renamed when complete: ``model.int8.onnx``
(or ``model.onnx`` with ``precision="fp32"``), ``pruned/`` (the pruned torch model,
:func:`mla.pretrained.save_pretrained`), ``job.json`` (the run's, so ``mla eval --onnx`` scores
the run's validation split) and ``compress_report.json`` (with ``reference``: the logits both
artefacts gave before they were written, which a reload must reproduce).
"""

from __future__ import annotations

import dataclasses
import json
import math
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
from mla.compress.onnx_export import OnnxLM, onnx_size_bytes
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
from workers.compress_exit import (
    check_exit_settings,
    check_exits_against_model,
    exit_stage_of,
)
from workers.compress_latency import (
    deploy_onnx,
    empty_model_latency_ms,
    latency_ms,
    shape_latency_ms,
)
from workers.data import WindowBatches, load_corpus
from workers.evaluation import DEFAULT_DATA, EvalData, evaluate

#: Fractions of MLP neurons and of GQA head groups a candidate keeps.
FFN_KEEP = (1.0, 0.75, 0.5, 0.375, 0.25)
GROUP_KEEP = (1.0, 0.75, 0.5, 0.25)
#: With ``search_hidden_layers``: each ``FFN_KEEP x GROUP_KEEP`` shape is also tried with this
#: fraction of hidden channels, and with :data:`LAYERS_DROP` fewer blocks (3x the shapes).
HIDDEN_KEEP = 0.75
LAYERS_DROP = 1
MB = 1e6


@dataclass(frozen=True)
class CompressSettings:
    """What ``mla compress`` was asked (validated by :func:`check_settings`).

    Attributes:
        target_mb: Size budget of the deployed file, in MB (10^6 bytes); ``None``: no size budget.
        target_latency_ms: Latency budget of the deployed file per forward pass of
            ``latency_batch`` windows, in ms, measured on this machine; ``None``: none.
        latency_batch: Windows per forward pass for ``target_latency_ms``.
        max_loss_increase: Largest accepted validation-loss increase over the teacher, in nats
            per token (``None``: no quality budget).
        precision: ``"int8"`` (ONNX Runtime dynamic INT8) or ``"fp32"``.
        steps: Distillation steps per distilled candidate.
        qat_steps: INT8 quantisation-aware distillation steps after recovery
            (:mod:`mla.compress.qat`; ``int8`` only).
        qat_lr: Peak learning rate of the QAT steps.
        early_exit: Exit layers of the early-exit stage (``()``: none; :mod:`workers.compress_exit`).
        exit_steps: Joint exit-loss distillation steps of that stage.
        exit_tolerance: Loss the calibrated exit threshold may cost, nats per token (``None``:
            derived, :func:`workers.compress_exit.exit_tolerance`).
        ffn_keep: Force this MLP width per layer (``None``: search).
        groups_keep: Force this many GQA head groups per layer (``None``: search).
        hidden_keep: Force this many hidden channels (``None``: all, or search).
        layers_keep: Force this many blocks (``None``: all, or search).
        search_hidden_layers: Also search hidden-channel and depth shapes (:data:`HIDDEN_KEEP`,
            :data:`LAYERS_DROP`).
        candidates: How many shapes within the budget are distilled.
        distill_batch: Distillation micro-batch, in windows.
        lr: Distillation peak learning rate.
        calib_windows: Training windows for the importance scores.
        val_windows: Validation windows scored for every loss in the report.
        threads: ONNX Runtime / torch threads for latency and scoring.
        tp: Tensor-parallel degree the pruned model must still support.
        seed: Seed of the distillation data order.
        recover: ``recover(student, settings, seq, tmp, progress) -> (student, losses)``
            distilling in place of :func:`mla.compress.distill.distill` (``--recovery ray``:
            :class:`orchestrator.compress_recovery.RayRecovery`), or ``None``.
    """

    target_mb: float | None = None
    target_latency_ms: float | None = None
    latency_batch: int = 1
    max_loss_increase: float | None = None
    precision: str = "int8"
    steps: int = 100
    qat_steps: int = 0
    qat_lr: float = 3e-4
    early_exit: tuple[int, ...] = ()
    exit_steps: int = 100
    exit_tolerance: float | None = None
    ffn_keep: int | None = None
    groups_keep: int | None = None
    hidden_keep: int | None = None
    layers_keep: int | None = None
    search_hidden_layers: bool = False
    candidates: int = 2
    distill_batch: int = 8
    lr: float = 1e-3
    calib_windows: int = 64
    val_windows: int = 64
    threads: int = 1
    tp: int = 1
    seed: int = 0
    recover: Callable[..., Any] | None = None


def check_settings(s: CompressSettings) -> None:
    """Refuse bad settings before any work (the model-dependent checks are
    :func:`check_against_model`).

    Raises:
        ConfigError: a value out of range (the message names the option, the value and the fix).
    """
    forced = (s.ffn_keep, s.groups_keep, s.hidden_keep, s.layers_keep)
    if all(v is None for v in (s.target_mb, s.target_latency_ms, *forced)):
        raise ConfigError(
            "nothing to fit: give --target-mb MB, --target-latency-ms MS, or a shape "
            "(--ffn-keep N / --groups-keep G / --hidden-keep H / --layers-keep L)"
        )
    if s.target_mb is not None and not (s.target_mb > 0 and math.isfinite(s.target_mb)):
        raise ConfigError(f"--target-mb={s.target_mb:g} must be a positive size in MB, e.g. 10")
    if s.target_latency_ms is not None and not (
        s.target_latency_ms > 0 and math.isfinite(s.target_latency_ms)
    ):
        raise ConfigError(
            f"--target-latency-ms={s.target_latency_ms:g} must be a positive time in ms, e.g. 20"
        )
    if s.max_loss_increase is not None and not s.max_loss_increase >= 0:
        raise ConfigError(
            f"--max-loss-increase={s.max_loss_increase:g} must be >= 0 nats per token, e.g. 0.05"
        )
    if s.precision not in ("int8", "fp32"):
        raise ConfigError(f"--precision={s.precision!r} must be 'int8' or 'fp32'")
    for name in (
        "candidates",
        "distill_batch",
        "latency_batch",
        "calib_windows",
        "val_windows",
        "threads",
        "tp",
    ):
        if getattr(s, name) < 1:
            flag = "batch" if name == "latency_batch" else name.replace("_", "-")
            raise ConfigError(f"--{flag}={getattr(s, name)} must be >= 1")
    if s.steps < 0:
        raise ConfigError(f"--steps={s.steps} must be >= 0")
    if s.qat_steps < 0:
        raise ConfigError(f"--qat-steps={s.qat_steps} must be >= 0")
    if s.qat_steps and s.precision != "int8":
        raise ConfigError(
            f"--qat-steps={s.qat_steps} simulates INT8, but --precision is {s.precision!r}; "
            "use --precision int8 or drop --qat-steps"
        )
    check_exit_settings(s.early_exit, s.exit_steps, s.exit_tolerance)
    if not (s.lr > 0 and math.isfinite(s.lr)):
        raise ConfigError(f"--lr={s.lr:g} must be a finite learning rate > 0, e.g. 1e-3")
    if not (s.qat_lr > 0 and math.isfinite(s.qat_lr)):
        raise ConfigError(f"qat_lr={s.qat_lr:g} must be a finite learning rate > 0, e.g. 3e-4")


def check_against_model(s: CompressSettings, cfg: ModelConfig, seq: int) -> dict:
    """Refuse targets this model cannot meet whatever is pruned, before any work on it.

    Checks a forced shape (:func:`mla.compress.prune.shape_problems`: pruning every head or
    every MLP neuron, tensor-parallel divisibility), a size below :func:`floor_bytes`, and a
    latency below that of the empty model (embedding, final norm and tied head, no block:
    :func:`empty_model_latency_ms`, measured now in the runtime the deployment uses).

    Returns:
        What was measured (``{"empty_model_latency_ms": ...}`` when a latency target is set).

    Raises:
        ConfigError: the target cannot be met; the message gives the measured floor.
    """
    f = cfg.ffn_hidden if s.ffn_keep is None else s.ffn_keep
    g = cfg.kv_heads if s.groups_keep is None else s.groups_keep
    problems = shape_problems(cfg, f, g, s.tp, s.hidden_keep, s.layers_keep)
    if problems:
        raise ConfigError(
            "--ffn-keep/--groups-keep/--hidden-keep/--layers-keep: "
            + "; ".join(_flag_names(p) for p in problems)
        )
    hidden_min, layers_min = _smallest_hidden_layers(cfg, s)
    if s.early_exit:  # every exit must sit before the last block of the shallowest student
        check_exits_against_model(s.early_exit, layers_min)
    floor = floor_bytes(cfg, s.precision, hidden_min, layers_min)
    if s.target_mb is not None and s.target_mb * MB < floor:
        raise ConfigError(
            f"--target-mb={s.target_mb:g} is below what this model takes with every prunable unit "
            f"removed ({floor / MB:.3f} MB: token embedding and norms, {s.precision}); raise "
            "--target-mb" + (" or use --precision int8" if s.precision == "fp32" else "")
        )
    measured: dict[str, float] = {}
    if s.target_latency_ms is not None:
        empty = empty_model_latency_ms(cfg, seq, s.latency_batch, s.precision, s.threads)
        measured["empty_model_latency_ms"] = empty
        if s.target_latency_ms < empty:
            raise ConfigError(
                f"--target-latency-ms={s.target_latency_ms:g} is below what an empty model takes "
                f"on this machine: embedding + tied head alone, no block, {s.precision}, batch "
                f"{s.latency_batch} x {seq} tokens, {s.threads} thread(s): {empty:.3f} ms measured; "
                "raise --target-latency-ms, lower --batch or raise --threads"
            )
    return measured


def _flag_names(problem: str) -> str:
    for field in ("ffn_keep", "groups_keep", "hidden_keep", "layers_keep"):
        problem = problem.replace(f"{field}=", f"--{field.replace('_', '-')}=")
    return problem


def _smallest_hidden_layers(cfg: ModelConfig, s: CompressSettings) -> tuple[int, int]:
    """Fewest hidden channels and blocks any shape of this run keeps (for :func:`floor_bytes`)."""
    if s.hidden_keep is not None or s.layers_keep is not None or not s.search_hidden_layers:
        return (s.hidden_keep or cfg.d_model, s.layers_keep or cfg.n_layers)
    return (
        min(cfg.d_model, _hidden_width(cfg)),
        max(1, cfg.n_layers - LAYERS_DROP),
    )


def _hidden_width(cfg: ModelConfig) -> int:
    return max(1, int(round(cfg.d_model * HIDDEN_KEEP)))


@dataclass(frozen=True)
class Candidate:
    """A pruning shape and what is known about it (``hidden_keep``/``layers_keep``: ``None``
    in hand-built candidates means all channels / blocks)."""

    ffn_keep: int
    groups_keep: int
    params: int
    predicted_mb: float
    masked_val_loss: float | None = None
    probe_latency_ms: float | None = None
    hidden_keep: int | None = None
    layers_keep: int | None = None

    def to_dict(self) -> dict:
        return dict(self.__dict__)

    @property
    def shape(self) -> tuple[int, int, int | None, int | None]:
        """``(ffn_keep, groups_keep, hidden_keep, layers_keep)``."""
        return (self.ffn_keep, self.groups_keep, self.hidden_keep, self.layers_keep)

    def name(self) -> str:
        """``ffn F groups G[ hidden H][ layers L]`` (the optional parts when set)."""
        out = f"ffn {self.ffn_keep} groups {self.groups_keep}"
        out += "" if self.hidden_keep is None else f" hidden {self.hidden_keep}"
        return out + ("" if self.layers_keep is None else f" layers {self.layers_keep}")


Shape = tuple[int, int, int, int]


def candidate_shapes(cfg: ModelConfig, tp: int, hidden_layers: bool = False) -> list[Shape]:
    """Distinct ``(ffn_keep, groups_keep, hidden_keep, layers_keep)`` shapes from
    :data:`FFN_KEEP` x :data:`GROUP_KEEP` (all channels and blocks kept; with
    ``hidden_layers`` each also with :data:`HIDDEN_KEEP` of the channels and with
    :data:`LAYERS_DROP` fewer blocks) that :func:`mla.compress.prune.shape_problems` accepts,
    largest first."""
    d, n = cfg.d_model, cfg.n_layers
    extra = [(_hidden_width(cfg), n), (d, n - LAYERS_DROP)] if hidden_layers else []
    out = set()
    for f in FFN_KEEP:
        ffn = max(tp, int(round(cfg.ffn_hidden * f / tp)) * tp)
        for g in GROUP_KEEP:
            groups = max(tp, int(round(cfg.kv_heads * g / tp)) * tp)
            for h, layers in [(d, n), *extra]:
                if not shape_problems(cfg, ffn, groups, tp, h, layers):
                    out.add((ffn, groups, h, layers))
    return sorted(out, key=lambda s: -count_parameters(pruned_config(cfg, *s)))


def predicted_bytes(
    teacher_file_bytes: int, teacher: ModelConfig, cfg: ModelConfig, bpw: int
) -> int:
    """Deployed size of ``cfg``: the teacher's measured file minus the removed weights and, per
    removed block, the block's share of the graph's non-weight bytes.

    Weights go at ``bpw`` bytes each except the RMSNorm weights (fp32, 4 bytes, in the INT8
    graph too); the tied embedding is one initializer (measured: removing hidden channels saves
    ``V`` weights per channel, not ``2 V``). The graph's other bytes (constants, quantisation
    scales, nodes: the file minus its weights) are split in ``n_layers + 1`` equal shares, one
    per block and one for the rest, and each removed block takes its share away (measured, INT8,
    d 64, 3 layers, seq 64: 60.5 KB of such bytes, 16.0 KB per block; predictions 0.5 % over
    the file for 40 channels, 0.7 % over for 2 layers, 2.2 % over for both with MLP 96 of 128).

    Example: a teacher file of 20.3 MB, 19.1M parameters, pruned to 6.45M, INT8 (1 byte per
    weight): ``20.3 - 12.66 = 7.6 MB`` (measured 7.7 MB, ../shared/anchors/compression, 3c).
    """
    teacher_weights = _weight_bytes(teacher, bpw)
    per_block = max(0, teacher_file_bytes - teacher_weights) / (teacher.n_layers + 1)
    removed_blocks = teacher.n_layers - cfg.n_layers
    return int(
        teacher_file_bytes
        - (teacher_weights - _weight_bytes(cfg, bpw))
        - per_block * removed_blocks
    )


def _weight_bytes(cfg: ModelConfig, bpw: int) -> int:
    norms = _norm_weights(cfg)
    return (count_parameters(cfg) - norms) * bpw + 4 * norms


def _norm_weights(cfg: ModelConfig) -> int:
    return cfg.d_model * (2 * cfg.n_layers + 1)


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


def _torch_fn(model: MLATransformer) -> Callable[[torch.Tensor], Any]:
    def run(x):
        with torch.no_grad():
            return model(torch.as_tensor(x))

    return run


def _profile(fn, val: EvalData, seq: int, rounds: int, batches: tuple[int, ...]) -> dict:
    x = val.inputs
    rows = {b: np.resize(x, (b, seq)) if len(x) < b else x[:b] for b in batches}
    loss = evaluate(fn, val, batch_size=8)["loss"]
    return {
        "latency_ms": {str(b): latency_ms(fn, r, rounds) for b, r in rows.items()},
        "val_loss": loss,
    }


def seq_len_of(job: dict | None, cfg: ModelConfig) -> int:
    """Window length ``mla compress`` scores and exports at: the run's ``data.seq_len`` (the
    default data settings without a run), at most ``max_seq_len``."""
    data = dict(DEFAULT_DATA, **((job or {}).get("data") or {}))
    return min(int(data["seq_len"]), cfg.max_seq_len)


def compress(
    teacher: MLATransformer,
    job: dict | None,
    settings: CompressSettings,
    out: Path,
    source: str,
    console: Console,
    measured: dict | None = None,
) -> dict:
    """Run the pipeline of the module docstring; write ``out`` atomically; return the report.

    Args:
        teacher: The trained model (eval mode, CPU, fp32).
        job: The run's ``job.json`` (data path, sequence length), or ``None`` for the defaults.
        settings: Validated settings (:func:`check_settings`, :func:`check_against_model`).
        out: Output folder (must not exist).
        source: The path the teacher came from (for the report).
        console: Where progress goes (stderr).
        measured: What :func:`check_against_model` measured (copied into the report).

    Returns:
        The report dict (also written as ``out/compress_report.json``); ``report["met"]`` says
        whether the size, latency and loss budgets were met.
    """
    torch.set_num_threads(settings.threads)
    data = dict(DEFAULT_DATA, **((job or {}).get("data") or {}))
    seq = seq_len_of(job, teacher.cfg)
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
        shown = {k: v for k, v in settings.__dict__.items() if k != "recover"}
        report.update(source=source, data=val.description, settings=shown)
        report.update(measured or {})
        if job is not None:
            (tmp / "job.json").write_text(json.dumps(job, indent=2) + "\n")
        (tmp / "compress_report.json").write_text(json.dumps(report, indent=2) + "\n")
        for leftover in tmp.glob("teacher.*"):
            leftover.unlink()
    return report


def _profile_batches(s: CompressSettings) -> tuple[int, ...]:
    return tuple(sorted({1, 8, s.latency_batch}))


def _shapes(cfg: ModelConfig, s: CompressSettings) -> list[Shape]:
    """The search grid, or the one shape the forced fields give (the others unpruned)."""
    forced = (s.ffn_keep, s.groups_keep, s.hidden_keep, s.layers_keep)
    if all(v is None for v in forced):
        return candidate_shapes(cfg, s.tp, s.search_hidden_layers)
    full = (cfg.ffn_hidden, cfg.kv_heads, cfg.d_model, cfg.n_layers)
    f, g, h, n = (a if v is None else v for v, a in zip(forced, full, strict=True))
    return [(f, g, h, n)]


def _shape_text(shape: tuple[int, int, int | None, int | None]) -> str:
    return "ffn_keep {}, groups_keep {}, hidden_keep {}, layers_keep {}".format(*shape)


def _plan(imp: Importance, cfg: ModelConfig, c: Candidate, tp: int) -> PrunePlan:
    return plan_pruning(imp, cfg, c.ffn_keep, c.groups_keep, tp, c.hidden_keep, c.layers_keep)


def _run(teacher, s: CompressSettings, seq, train, val, bpw, tmp: Path, stages: Stages) -> dict:
    cfg = teacher.cfg
    rounds = 5
    step = stages.stage("teacher: torch fp32 latency + loss", 1)
    teacher_row = {
        "params": count_parameters(cfg),
        "size_mb": 4 * count_parameters(cfg) / MB,
        **_profile(_torch_fn(teacher), val, seq, rounds, _profile_batches(s)),
    }
    step(1)
    step = stages.stage(f"teacher: ONNX {s.precision} export", 1)
    teacher_file = deploy_onnx(teacher, tmp / "teacher.onnx", seq, s.precision)
    teacher_deployed = {"size_mb": onnx_size_bytes(teacher_file) / MB}
    teacher_deployed.update(
        _profile(OnnxLM(teacher_file, s.threads), val, seq, rounds, _profile_batches(s))
    )
    step(1)
    step = stages.stage("calibrate: importance", s.calib_windows)
    calib = _calibration(train, s.calib_windows, step)
    imp = measure_importance(teacher, calib)
    shapes = _shapes(cfg, s)
    budget = math.inf if s.target_mb is None else s.target_mb * MB
    file_bytes = onnx_size_bytes(teacher_file)
    fits = [
        Candidate(f, g, count_parameters(small), p / MB, None, None, h, n)
        for f, g, h, n in shapes
        if (p := predicted_bytes(file_bytes, cfg, small := pruned_config(cfg, f, g, h, n), bpw))
        <= budget
    ]
    report: dict[str, Any] = {
        "teacher": teacher_row,
        f"teacher_onnx_{s.precision}": teacher_deployed,
        "candidates_considered": len(shapes),
    }
    if not fits:
        smallest = min(shapes, key=lambda sh: count_parameters(pruned_config(cfg, *sh)))
        best_mb = (
            predicted_bytes(onnx_size_bytes(teacher_file), cfg, pruned_config(cfg, *smallest), bpw)
            / MB
        )
        report["met"] = {"size": False, "latency": None, "loss": None}
        report["failure"] = (
            f"no pruning shape fits --target-mb {s.target_mb:g}: the smallest candidate "
            f"({_shape_text(smallest)}) is predicted at {best_mb:.3f} MB; "
            f"raise --target-mb to at least {math.ceil(best_mb * 100) / 100:g}"
            + (" or use --precision int8" if s.precision == "fp32" else "")
        )
        return report
    if s.target_latency_ms is not None:
        probed, fits, failure = _latency_fits(teacher, imp, fits, s, seq, tmp, stages)
        report["candidates_latency_probed"] = [c.to_dict() for c in probed]
        if failure:
            report["met"] = {"size": None, "latency": False, "loss": None}  # nothing deployed
            report["failure"] = failure
            return report
    step = stages.stage("candidates: loss with units masked", len(fits))
    ranked = _rank(teacher, imp, fits, val, s.tp, step)
    report["candidates_within_budget"] = [c.to_dict() for c in ranked]
    return _distil_and_deploy(teacher, imp, ranked, s, seq, train, val, tmp, stages, report)


def _latency_fits(
    teacher, imp, fits: list[Candidate], s: CompressSettings, seq, tmp, stages
) -> tuple[list[Candidate], list[Candidate], str | None]:
    """Measure the deployed latency of shapes until ``s.candidates`` meet the target.

    The most aggressive shape (fewest parameters) is probed first: if even it misses, nothing
    can meet the target (latency grows with every kept unit) and the search stops. Otherwise
    shapes are probed from the least aggressive (most parameters) down, and the first
    ``s.candidates`` that meet the target are kept: the least aggressive shapes that meet it.

    Returns:
        ``(every probed candidate, the kept ones, failure message or None)``.
    """
    target = float(s.target_latency_ms)  # type: ignore[arg-type]
    step = stages.stage(f"latency: ONNX {s.precision} batch {s.latency_batch}", len(fits))
    cfg = teacher.cfg

    def probe(c: Candidate) -> Candidate:
        plan = _plan(imp, cfg, c, s.tp)
        ms = shape_latency_ms(
            apply_pruning(teacher, plan), seq, s.latency_batch, s.precision, s.threads, tmp
        )
        step(note=f"{c.name()}: {ms:.2f} ms")
        return dataclasses.replace(c, probe_latency_ms=ms)

    first = min(fits, key=lambda c: c.params)
    smallest = probe(first)
    ms = float(smallest.probe_latency_ms or 0.0)
    if ms > target:
        return (
            [smallest],
            [],
            (
                f"no pruning shape meets --target-latency-ms {target:g} at batch {s.latency_batch}: "
                f"the smallest ({_shape_text(smallest.shape)}) "
                f"takes {ms:.3f} ms here; raise --target-latency-ms to at least "
                f"{math.ceil(ms * 100) / 100:g}, lower --batch or raise --threads"
            ),
        )
    probed, kept = [smallest], []
    for c in sorted(fits, key=lambda c: -c.params):
        p = smallest if c is first else probe(c)
        if p is not smallest:
            probed.append(p)
        if float(p.probe_latency_ms or 0.0) <= target:
            kept.append(p)
            if len(kept) >= s.candidates:
                break
    return probed, kept, None


def _distil_and_deploy(teacher, imp, ranked, s, seq, train, val, tmp, stages, report) -> dict:
    rounds = 5
    tried = []
    for cand in ranked[: s.candidates]:
        plan = _plan(imp, teacher.cfg, cand, s.tp)
        student = apply_pruning(teacher, plan)
        unpruned = student.cfg == teacher.cfg
        steps = 0 if unpruned else s.steps
        step = stages.stage(f"distil {cand.name()}", max(1, steps))
        if s.recover is not None and steps:  # e.g. through the cluster's trainer
            student, losses = s.recover(student, s, seq, tmp, step)
        else:
            losses = distill(
                student,
                teacher,
                _batches(train, s.distill_batch, s.seed),
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
    exit_stage = exit_stage_of(s)
    if exit_stage:
        loss = exit_stage.train(
            student, teacher, _batches(train, s.distill_batch, s.seed + 2), _val_loss(val), stages
        )
    if s.qat_steps:
        loss = _qat(student, teacher, s, train, val, stages, report, loss)
    step = stages.stage(f"deploy: ONNX {s.precision} + verify", 1)
    name = "model.int8.onnx" if s.precision == "int8" else "model.onnx"
    deployed = deploy_onnx(student, tmp / name, seq, s.precision)
    save_pretrained(
        student, tmp / "pruned", source={"compressed_from": str(report.get("source", ""))}
    )
    if exit_stage:
        t_loss = report["teacher"]["val_loss"]
        report["early_exit"] = exit_stage.finish(student, val, t_loss, tmp / "pruned", stages)
    onnx_lm = OnnxLM(deployed, s.threads)
    row = {
        **cand.to_dict(),
        "file": name,
        "size_mb": onnx_size_bytes(deployed) / MB,
        "torch_val_loss": loss,
        **_profile(onnx_lm, val, seq, rounds, _profile_batches(s)),
    }
    report["reference"] = _reference_outputs(student, onnx_lm, val)
    step(1)
    t = report["teacher"]
    row["loss_increase"] = row["val_loss"] - t["val_loss"]
    row["size_ratio"] = t["size_mb"] / row["size_mb"]
    row["speedup"] = {b: t["latency_ms"][b] / row["latency_ms"][b] for b in row["latency_ms"]}
    report["deployed"] = row
    report["met"], failure = _verdict(row, cand, s)
    if failure:
        report["failure"] = failure
    return report


def _val_loss(val: EvalData) -> Callable[[MLATransformer], float]:
    return lambda m: evaluate(m, val, batch_size=8)["loss"]


def _verdict(row: dict, cand: Candidate, s: CompressSettings) -> tuple[dict, str | None]:
    """Which budgets the deployed file met, and the first one it missed (a message)."""
    size_ok = None if s.target_mb is None else row["size_mb"] <= s.target_mb
    ms = row["latency_ms"][str(s.latency_batch)]
    lat_ok = None if s.target_latency_ms is None else ms <= s.target_latency_ms
    loss_ok = None if s.max_loss_increase is None else row["loss_increase"] <= s.max_loss_increase
    met = {"size": size_ok, "latency": lat_ok, "loss": loss_ok}
    if size_ok is False:
        return met, (
            f"the deployed file is {row['size_mb']:.3f} MB, over --target-mb {s.target_mb:g} "
            f"(predicted {cand.predicted_mb:.3f} MB); raise --target-mb"
        )
    if lat_ok is False:
        return met, (
            f"the deployed file takes {ms:.3f} ms at batch {s.latency_batch}, over "
            f"--target-latency-ms {s.target_latency_ms:g} (the probe of its shape took "
            f"{cand.probe_latency_ms:.3f} ms: this machine's load varies); raise "
            "--target-latency-ms or run on a quieter machine"
        )
    if loss_ok is False:
        return met, (
            f"validation loss rose by {row['loss_increase']:.4f} nats/token, over "
            f"--max-loss-increase {s.max_loss_increase:g}; raise the budget (less pruning), "
            "--steps (more distillation) or --max-loss-increase"
        )
    return met, None


def _qat(student, teacher, s: CompressSettings, train, val, stages, report, loss: float) -> float:
    """``s.qat_steps`` of INT8 quantisation-aware distillation of ``student``, in place
    (:func:`mla.compress.qat.qat_distill`); records its row; returns the new torch val loss."""
    from mla.compress.qat import qat_distill

    step = stages.stage("QAT: INT8 fake-quant distillation", s.qat_steps)
    losses = qat_distill(
        student,
        teacher,
        _batches(train, s.distill_batch, s.seed + 1),
        s.qat_steps,
        s.qat_lr,
        progress=_kl_note(step),
    )
    after = evaluate(student, val, batch_size=8)["loss"]
    report["qat"] = {
        "steps": s.qat_steps,
        "torch_val_loss_before": loss,
        "torch_val_loss_after": after,
        "final_kl": losses[-1] if losses else None,
        "fake_quant": "torchao QATConfig: int8 per-token asymmetric activations, int8 "
        "per-channel symmetric weights, every nn.Linear",
    }
    return after


def _reference_outputs(student: MLATransformer, onnx_lm: OnnxLM, val: EvalData) -> dict:
    """Logits at the last position of validation window 0 from the torch model and the
    deployed file, as written: a reload must give exactly these."""
    x = val.inputs[:1]
    with torch.no_grad():
        t = student(torch.from_numpy(x))[0, -1]
    return {
        "tokens": x[0].tolist(),
        "torch_logits_last": t.tolist(),
        "onnx_logits_last": onnx_lm(x)[0, -1].tolist(),
    }


def _kl_note(step: Callable[..., None]) -> Callable[[int, float], None]:
    def note(i: int, loss: float) -> None:
        step(i, f"KL {loss:.4f}")

    return note


def floor_bytes(
    cfg: ModelConfig, precision: str, hidden: int | None = None, layers: int | None = None
) -> int:
    """Bytes no pruning shape removes: the token embedding (stored once in the ONNX graph: the
    Gather table and the tied head's MatMul share one initializer, INT8 after quantisation,
    measured) at the precision's bytes per weight, plus every RMSNorm in fp32, at ``hidden``
    channels and ``layers`` blocks (the fewest any shape of the run keeps; default: all). A
    target below it cannot be met.

    Example: vocab 256, d 128, 4 layers, INT8: ``256 * 128 + 4 * 128 * 9 = 37,376`` bytes.
    """
    bpw = 1 if precision == "int8" else 4
    d, n = hidden or cfg.d_model, layers or cfg.n_layers
    return cfg.vocab_size * d * bpw + 4 * d * (2 * n + 1)


def _calibration(train: WindowBatches, n: int, step) -> list[torch.Tensor]:
    x, _ = train.windows(np.arange(min(n, train.n_windows)))
    step(len(x))
    return [torch.from_numpy(x[i : i + 8]) for i in range(0, len(x), 8)]


def _rank(
    teacher, imp: Importance, fits: list[Candidate], val: EvalData, tp: int, step
) -> list[Candidate]:
    out = []
    for c in fits:
        plan = _plan(imp, teacher.cfg, c, tp)
        with masked(teacher, plan):
            loss = evaluate(teacher, val, batch_size=8)["loss"]
        out.append(dataclasses.replace(c, masked_val_loss=loss))
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
