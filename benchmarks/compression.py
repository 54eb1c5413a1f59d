"""Compression benchmark: the original model and its compressed variants, side by side.

Trains the ``tiny`` preset (MLA attention, d 128, 4 layers, 4 heads, SwiGLU 352) with a plain
torch AdamW loop on the default corpus (Python standard library sources, byte tokens, seq 128),
logging validation loss along the way so the curve shows whether it has flattened; then builds

* ``original``: torch fp32, ONNX Runtime fp32, ONNX Runtime INT8 (post-training, dynamic);
* ``pruned``: MLP 50 % and half the head groups by activation importance
  (:mod:`mla.compress.prune`), no recovery;
* ``pruned+KD``: the same after ``distill_steps`` of logit distillation from the original;
* ``pruned+KD INT8``: that, exported and quantised (the combination ``mla compress`` deploys);
* ``pruned+KD+QAT INT8``: ``qat_steps`` more distillation steps under torchao INT8 fake
  quantisation (:mod:`mla.compress.qat`), converted back to plain modules, then the same export
  (``mla compress --qat-steps``). Its fair comparison is ``pruned+KD`` given the same number of
  extra plain distillation steps, also measured (``pruned+KD+more``);
* early exit (:mod:`mla.compress.early_exit`): the original fine-tuned ``exit_steps`` with the
  exit loss (shared head after layers 1-3 of 4), then per threshold: validation loss with each
  token's logits from its exit and the layers it used (full-sequence scoring: every layer runs,
  so this is compute saved, not time); and greedy KV-cache decoding of 64 new tokens at batch 1
  with exits vs the same model without (wall time, tokens/s);
* ``original+exits`` and ``combination`` (pruned + KD + exits, INT8): the stage of ``mla
  compress --early-exit`` (:mod:`workers.compress_exit`: joint exit-loss training, threshold
  calibrated on the validation windows to ``exit_tolerance``) on the original and on the
  pruned+KD student. Their size, forward latency and ``val_loss`` are the full-depth model
  (torch fp32 for ``original+exits``, the ONNX Runtime INT8 file for the combination, which is
  always full depth); the exits are measured on the torch path of the same weights
  (``exit_val_loss``, ``compute_saved``, batch-1 KV-cache decoding tokens/s with and without).

For each: size on disk (safetensors file of the torch weights, or the ONNX file), latency per
forward pass at batch 1 and 8 (minimum over interleaved rounds: every variant is timed once per
round, so load from other processes on this shared machine hits them alike), and validation
loss on the same fixed windows. Ratios are against torch fp32 of the original, measured in the
same run.

Run: ``python -m benchmarks.compression [--steps 300] [--distill-steps 100] [--qat-steps 30]
[--exit-steps 60] [--exit-tolerance 0.02] [--threads 1] [--json]`` (about 10-15 minutes on one busy core).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mla.compress.distill import distill
from mla.compress.early_exit import (
    calibrate_threshold,
    early_exit_forward,
    early_exit_loss,
    generate_early_exit,
)
from mla.compress.importance import measure_importance
from mla.compress.onnx_export import OnnxLM, onnx_size_bytes
from mla.compress.prune import apply_pruning, plan_pruning
from mla.compress.qat import qat_distill
from mla.config import get_preset
from mla.generate import generate
from mla.model import MLATransformer
from mla.pretrained import WEIGHTS, save_pretrained
from mla.sampling import SamplingConfig
from workers.compress_exit import decode_speed, routed_eval, train_exits
from workers.compress_latency import deploy_onnx
from workers.data import WindowBatches, load_corpus
from workers.evaluation import EvalData, evaluate


def train_teacher(
    steps: int, seq: int, batch: int, val: EvalData, log
) -> tuple[MLATransformer, list]:
    """The tiny preset after ``steps`` AdamW steps (lr 3e-3, cosine to 3e-4); val-loss curve."""
    torch.manual_seed(0)
    model = MLATransformer(get_preset("tiny"))
    train = WindowBatches(load_corpus(None).train, seq, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    curve = []
    for step in range(steps):
        lr = 3e-4 + 0.5 * (3e-3 - 3e-4) * (1 + np.cos(np.pi * step / steps))
        for g in opt.param_groups:
            g["lr"] = lr
        x, y = (torch.from_numpy(a) for a in train.rank_slice(step, batch, 0, 1))
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        if (step + 1) % 50 == 0 or step + 1 == steps:
            curve.append((step + 1, evaluate(model, val, 8)["loss"]))
            log(f"train step {step + 1}: val loss {curve[-1][1]:.4f}")
            model.train()
    return model.eval(), curve


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--distill-steps", type=int, default=100)
    p.add_argument("--qat-steps", type=int, default=30)
    p.add_argument("--exit-steps", type=int, default=60)
    p.add_argument("--exit-tolerance", type=float, default=0.02)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    seq, batch = 128, 16
    vb = WindowBatches(load_corpus(None).val, seq, seed=0, shuffle=False)
    vx, vy = vb.windows(np.arange(64))
    val = EvalData(vx, vy, "64 validation windows of 128 tokens")
    t0 = time.time()
    teacher, curve = train_teacher(a.steps, seq, batch, val, log)
    train = WindowBatches(load_corpus(None).train, seq, seed=1)
    calib = [torch.from_numpy(train.windows(np.arange(i, i + 8))[0]) for i in range(0, 64, 8)]
    cfg = teacher.cfg
    plan = plan_pruning(
        measure_importance(teacher, calib), cfg, cfg.ffn_hidden // 2, cfg.kv_heads // 2
    )
    pruned = apply_pruning(teacher, plan)
    student = apply_pruning(teacher, plan)
    batches = (
        tuple(torch.from_numpy(t) for t in train.rank_slice(10_000 + i, batch, 0, 1))
        for i in range(10**9)
    )
    distill(student, teacher, batches, a.distill_steps, lr=1e-3)
    log(f"distilled {a.distill_steps} steps")
    qat, more = copy.deepcopy(student), copy.deepcopy(student)
    qat_distill(qat, teacher, batches, a.qat_steps, lr=3e-4)
    distill(more, teacher, batches, a.qat_steps, lr=3e-4)
    log(f"QAT {a.qat_steps} steps (and as many plain KD steps)")
    exits = early_exit_study(teacher, batches, val, a.exit_steps, log)
    orig_exit, orig_exit_row = exit_stage(teacher, teacher, batches, val, a, log)
    combo, combo_row = exit_stage(student, teacher, batches, val, a, log)
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        variants = {}
        for name, model in (
            ("original torch fp32", teacher),
            ("pruned torch fp32", pruned),
            ("pruned+KD torch fp32", student),
            ("pruned+KD+more torch fp32", more),
            ("original+exits torch fp32", orig_exit),
        ):
            folder = save_pretrained(model, d / name.replace(" ", "_"))
            variants[name] = (model, (folder / WEIGHTS).stat().st_size)
        for name, model, prec in (
            ("original ORT fp32", teacher, "fp32"),
            ("original ORT INT8 (PTQ)", teacher, "int8"),
            ("pruned+KD ORT INT8", student, "int8"),
            ("pruned+KD+more ORT INT8", more, "int8"),
            ("pruned+KD+QAT ORT INT8", qat, "int8"),
            ("combination ORT INT8", combo, "int8"),
        ):
            log(f"exporting {name}")
            path = deploy_onnx(model, d / f"{name.split()[0]}.{prec}.onnx", seq, prec)
            variants[name] = (OnnxLM(path, a.threads), onnx_size_bytes(path))
        rows = measure(variants, val, a.rounds, log)
    rows["original+exits torch fp32"].update(orig_exit_row)
    rows["combination ORT INT8"].update(combo_row)
    base = rows["original torch fp32"]
    for r in rows.values():
        r["size_ratio"] = base["size_mb"] / r["size_mb"]
        r["speedup_b1"] = base["ms_b1"] / r["ms_b1"]
        r["speedup_b8"] = base["ms_b8"] / r["ms_b8"]
        r["loss_increase_pct"] = 100 * (r["val_loss"] - base["val_loss"]) / base["val_loss"]
        if "exit_val_loss" in r:
            r["exit_loss_increase_pct"] = (
                100 * (r["exit_val_loss"] - base["val_loss"]) / base["val_loss"]
            )
    doc = {
        "model": cfg.to_dict(),
        "pruned": {"ffn_hidden": plan.ffn_keep, "kv_groups": plan.groups_keep},
        "teacher_steps": a.steps,
        "val_curve": curve,
        "threads": a.threads,
        "wall_s": time.time() - t0,
        "rows": rows,
        "early_exit": exits,
    }
    if a.json:
        print(json.dumps(doc, indent=2))
    else:
        print(
            f"{'variant':<26}{'size MB':>9}{'x':>6}{'b1 ms':>8}{'x':>6}{'b8 ms':>8}{'x':>6}{'val':>8}{'Δ%':>7}"
        )
        for n, r in rows.items():
            print(
                f"{n:<26}{r['size_mb']:>9.3f}{r['size_ratio']:>6.2f}{r['ms_b1']:>8.2f}{r['speedup_b1']:>6.2f}"
                f"{r['ms_b8']:>8.2f}{r['speedup_b8']:>6.2f}{r['val_loss']:>8.4f}{r['loss_increase_pct']:>+7.2f}"
            )
        print(f"val curve (step, loss): {[(s, round(v, 4)) for s, v in curve]}")
        print(
            f"{'with exits (torch path)':<26}{'threshold':>10}{'val':>8}{'Δ%':>7}{'saved':>7}"
            f"{'decode tok/s exits':>19}{'full':>7}{'x':>6}{'thr 1.0':>8}{'x':>6}"
        )
        for n, r in rows.items():
            if "exit_val_loss" in r:
                dec = r["exit_decode_batch1"]
                print(
                    f"{n:<26}{r['exit_threshold']:>10.2f}{r['exit_val_loss']:>8.4f}"
                    f"{r['exit_loss_increase_pct']:>+7.2f}{r['exit_compute_saved']:>7.1%}"
                    f"{dec['tokens_per_s_exit']:>19.0f}{dec['tokens_per_s_full']:>7.0f}"
                    f"{dec['speedup']:>6.2f}{dec['tokens_per_s_threshold_1']:>8.0f}"
                    f"{dec['speedup_vs_threshold_1']:>6.2f}"
                )
        e = exits
        print(
            f"early exit after layers {e['exits']} (+{e['exit_steps']} exit-loss steps): val "
            f"{e['val_loss_full']:.4f} with every layer; decode 64 tokens at batch 1: "
            f"{e['decode_ms_full']:.0f} ms without exits"
        )
        print(
            f"{'threshold':>10}{'val':>8}{'Δ%':>7}{'mean layers':>12}{'saved':>7}{'decode ms':>10}{'x':>6}{'dec layers':>11}"
        )
        for r in e["thresholds"]:
            print(
                f"{r['threshold']:>10.2f}{r['val_loss']:>8.4f}{r['loss_increase_pct']:>+7.2f}"
                f"{r['mean_layers']:>12.2f}{r['compute_saved']:>7.1%}{r['decode_ms']:>10.0f}"
                f"{r['decode_speedup']:>6.2f}{r['decode_mean_layers']:>11.2f}"
            )
    return 0


def early_exit_study(teacher, batches, val: EvalData, steps: int, log) -> dict:
    """Fine-tune a copy of ``teacher`` with the exit loss; score thresholds (full-sequence val
    loss, layers used) and time greedy decoding at batch 1 with and without exits."""
    model = copy.deepcopy(teacher)
    n = model.cfg.n_layers
    exits = list(range(1, n))
    distill(model, teacher, batches, steps, lr=1e-3, loss_fn=early_exit_loss(exits))
    log(f"exit loss: {steps} steps")
    prompt = [list(val.inputs[0, :32])]
    greedy = SamplingConfig(temperature=0.0)

    def timed(fn) -> tuple[float, object]:
        best, out = float("inf"), None
        for _ in range(3):
            t = time.perf_counter()
            out = fn()
            best = min(best, time.perf_counter() - t)
        return best * 1e3, out

    full_ms, _ = timed(lambda: generate(model, prompt, 64, greedy))
    full_val = _exit_val(model, val, exits, 1.0)[0]
    rows = []
    for th in (1.0, 0.95, 0.9, 0.8, 0.5):
        loss, stats = _exit_val(model, val, exits, th)
        ms, (_, dec) = timed(
            lambda th=th: generate_early_exit(model, prompt, 64, greedy, exits, th)
        )
        rows.append(
            {
                "threshold": th,
                "val_loss": loss,
                "loss_increase_pct": 100 * (loss - full_val) / full_val,
                "mean_layers": stats.mean_layers,
                "compute_saved": stats.compute_saved,
                "exit_fractions": stats.fractions(),
                "decode_ms": ms,
                "decode_speedup": full_ms / ms,
                "decode_mean_layers": dec.mean_layers,
            }
        )
        log(f"threshold {th}: val {loss:.4f}, mean layers {stats.mean_layers:.2f}")
    base = evaluate(teacher, val, 8)["loss"]
    return {
        "exits": exits,
        "exit_steps": steps,
        "teacher_val_loss": base,
        "val_loss_full": full_val,
        "decode_ms_full": full_ms,
        "thresholds": rows,
    }


def exit_stage(model, teacher, batches, val: EvalData, a, log) -> tuple[MLATransformer, dict]:
    """A copy of ``model`` through the stage of ``mla compress --early-exit 1..L-1``
    (:mod:`workers.compress_exit`): joint exit-loss training, calibration to
    ``a.exit_tolerance`` on ``val``, routing and batch-1 decoding speed."""
    m = copy.deepcopy(model)
    exits = list(range(1, m.cfg.n_layers))
    train_exits(m, teacher, exits, batches, a.exit_steps, 1e-3)
    vb = [
        (torch.from_numpy(val.inputs[i : i + 8]), torch.from_numpy(val.targets[i : i + 8]))
        for i in range(0, len(val.inputs), 8)
    ]
    threshold, _ = calibrate_threshold(m, vb, exits, a.exit_tolerance)
    routed = routed_eval(m, val, exits, threshold)
    decode = decode_speed(m, val.inputs[0, :32].tolist(), exits, threshold)
    log(f"exit stage: threshold {threshold}, compute saved {routed['compute_saved']:.1%}")
    return m, {
        "exits": exits,
        "exit_threshold": threshold,
        "exit_tolerance": a.exit_tolerance,
        "exit_val_loss": routed["val_loss"],
        "exit_val_loss_full_torch": routed["val_loss_full"],
        "exit_fractions": routed["exit_fractions"],
        "exit_mean_layers": routed["mean_layers"],
        "exit_compute_saved": routed["compute_saved"],
        "exit_decode_batch1": decode,
    }


def _exit_val(model, val: EvalData, exits, threshold):
    total, count, layers = 0.0, 0, []
    for i in range(0, len(val.inputs), 8):
        x = torch.from_numpy(val.inputs[i : i + 8])
        y = torch.from_numpy(val.targets[i : i + 8])
        logits, stats = early_exit_forward(model, x, exits, threshold)
        total += float(F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum"))
        count += y.numel()
        layers.append(stats.layers.flatten())
    return total / count, type(stats)(torch.cat(layers), stats.n_layers, stats.exits)


def measure(variants: dict, val: EvalData, rounds: int, log) -> dict:
    """Val loss of every variant, then latency at batch 1 and 8, interleaved over rounds."""
    rows = {}
    for name, (model, size) in variants.items():
        rows[name] = {"size_mb": size / 1e6, "val_loss": evaluate(model, val, 8)["loss"]}
    xs = {b: val.inputs[:b] for b in (1, 8)}
    best = {(n, b): float("inf") for n in variants for b in xs}
    for r in range(rounds + 1):  # round 0 warms up
        for name, (model, _) in variants.items():
            for b, x in xs.items():
                t = time.perf_counter()
                with torch.no_grad():
                    model(torch.from_numpy(x))
                if r:
                    best[name, b] = min(best[name, b], time.perf_counter() - t)
        log(f"latency round {r}/{rounds}")
    for (name, b), s in best.items():
        rows[name][f"ms_b{b}"] = s * 1e3
    return rows


if __name__ == "__main__":
    sys.exit(main())
