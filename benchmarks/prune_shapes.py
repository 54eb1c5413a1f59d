"""Loss of hidden-channel and depth pruning vs MLP/head pruning of similar parameter count,
before any recovery, on the same trained model in one run.

Trains the ``tiny`` preset (:func:`benchmarks.compression.train_teacher`), measures the
activation importance on 64 training windows (:mod:`mla.compress.importance`: Minitron
norm-output scores for hidden channels, ShortGPT Block Influence for layers), then for each
hidden/depth shape and for the MLP-width/head-group shapes whose parameter count is closest to
it (any number of head groups, at least half of them, all of them: MLP width alone), prints the validation loss with the removed units masked (equal to the physically pruned
model's; checked here on every shape) and its increase over the unpruned model.

Usage: ``python -m benchmarks.prune_shapes --steps 300 [--json]`` (1 thread; ~7 min on this loaded machine).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch

from benchmarks.compression import train_teacher
from mla.compress.importance import measure_importance
from mla.compress.prune import apply_pruning, masked, plan_pruning, pruned_config
from mla.config import ModelConfig
from mla.flops import count_parameters
from workers.data import WindowBatches, load_corpus
from workers.evaluation import EvalData, evaluate

Shape = tuple[int, int, int | None, int | None]


def closest_width_shape(cfg: ModelConfig, params: int, min_groups: int = 1) -> Shape:
    """The ``(ffn_keep, groups_keep)`` shape (MLP width in steps of 8, at least ``min_groups``
    head groups, all channels and layers) whose parameter count is closest to ``params``."""
    best = min(
        (
            (f, g)
            for f in range(8, cfg.ffn_hidden + 1, 8)
            for g in range(min_groups, cfg.kv_heads + 1)
        ),
        key=lambda s: abs(count_parameters(pruned_config(cfg, *s)) - params),
    )
    return (best[0], best[1], None, None)


def masked_row(teacher, imp, shape: Shape, val: EvalData, base: float) -> dict:
    cfg = teacher.cfg
    plan = plan_pruning(imp, cfg, shape[0], shape[1], 1, shape[2], shape[3])
    with masked(teacher, plan):
        loss = evaluate(teacher, val, 8)["loss"]
    physical = evaluate(apply_pruning(teacher, plan), val, 8)["loss"]
    params = count_parameters(pruned_config(cfg, *shape))
    return {
        "shape": dict(
            zip(("ffn_keep", "groups_keep", "hidden_keep", "layers_keep"), shape, strict=True)
        ),
        "params": params,
        "params_ratio": count_parameters(cfg) / params,
        "masked_val_loss": loss,
        "physical_val_loss": physical,
        "loss_increase": loss - base,
        "loss_increase_pct": 100 * (loss - base) / base,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    seq, batch, t0 = 128, 16, time.time()
    vb = WindowBatches(load_corpus(None).val, seq, seed=0, shuffle=False)
    vx, vy = vb.windows(np.arange(64))
    val = EvalData(vx, vy, "64 validation windows of 128 tokens")
    teacher, curve = train_teacher(a.steps, seq, batch, val, log)
    train = WindowBatches(load_corpus(None).train, seq, seed=1)
    calib = [torch.from_numpy(train.windows(np.arange(i, i + 8))[0]) for i in range(0, 64, 8)]
    imp = measure_importance(teacher, calib)
    cfg = teacher.cfg
    base = evaluate(teacher, val, 8)["loss"]
    d, n = cfg.d_model, cfg.n_layers
    targets: list[tuple[str, Shape]] = [
        ("hidden 0.75", (cfg.ffn_hidden, cfg.kv_heads, d * 3 // 4, None)),
        ("hidden 0.5", (cfg.ffn_hidden, cfg.kv_heads, d // 2, None)),
        (f"layers {n - 1} of {n}", (cfg.ffn_hidden, cfg.kv_heads, None, n - 1)),
        (f"layers {n - 2} of {n}", (cfg.ffn_hidden, cfg.kv_heads, None, n - 2)),
    ]
    rows = []
    for name, shape in targets:
        row = masked_row(teacher, imp, shape, val, base)
        rows.append({"name": name, **row})
        for min_groups in (1, cfg.kv_heads // 2, cfg.kv_heads):  # any, half the groups, MLP only
            w = closest_width_shape(cfg, row["params"], max(1, min_groups))
            rows.append(
                {"name": f"  vs ffn {w[0]} groups {w[1]}", **masked_row(teacher, imp, w, val, base)}
            )
    result = {
        "model": f"tiny preset, {count_parameters(cfg)} parameters, {a.steps} steps",
        "val_curve": curve,
        "teacher_val_loss": base,
        "block_influence": imp.layers.tolist() if imp.layers is not None else None,
        "rows": rows,
        "wall_s": time.time() - t0,
    }
    for r in rows:
        log(
            f"{r['name']:<28} params {r['params']:>8} ({r['params_ratio']:.2f}x fewer)  "
            f"masked val {r['masked_val_loss']:.4f} (+{r['loss_increase']:.4f}, "
            f"{r['loss_increase_pct']:+.1f} %)  physical {r['physical_val_loss']:.4f}"
        )
    if a.json:
        print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
