"""Planner benchmark: published layouts, efficiency fit, the 100B seed claim, planning speed.

Run: ``.venv/bin/python benchmarks/planner.py`` (about 15 s on 2 cores). Prints

1. every usable row of tests/fixtures/planner/published_layouts.csv: the published (tp, pp), whether
   it is predicted to fit, the planner's best (tp, pp) under the same constraints (GPUs, batch,
   precision, recompute policy, ZeRO stage where stated) and the achieved vs predicted throughput;
2. the efficiency fitted to those rows, with in-sample and leave-one-out median errors;
3. the smallest number of 80 GB GPUs for a 100B-parameter model with pure data parallelism
   (tp = pp = 1, any ZeRO stage; and plain DDP) versus any hybrid layout;
4. the time to plan a 70B model on 4,096 GPUs, next to planning 64 GPUs in the same run.
"""

from __future__ import annotations

import time
from pathlib import Path

from mla.config import PRESETS
from orchestrator.errors import PlanError
from orchestrator.planner import PlanRequest, Pins, min_gpus, model_from_params, plan
from orchestrator.planner.calibrate import (fit_efficiency, leave_one_out, load_published, median, predicted,
                                            published_candidate)
from orchestrator.planner.step_time import DEFAULT_EFFICIENCY

CSV = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "planner" / "published_layouts.csv"


def published_table() -> None:
    rows, skipped = load_published(CSV)
    print(f"== published layouts: {len(rows)} usable rows, {len(skipped)} skipped "
          f"(missing dims/batch, MoE/CP, TPU/H800)")
    print(f"{'model':34s} {'GPUs':>5s} {'pub tp,pp':>9s} {'fits':>5s} {'GiB':>5s} {'best tp,pp':>10s} "
          f"{'match':>5s}  achieved vs predicted (eff {DEFAULT_EFFICIENCY})")
    pairs, matches = [], 0
    for row in rows:
        try:
            cand = published_candidate(row)
            fits, gib = "yes", f"{cand.estimate.memory.total / 2**30:5.1f}"
        except PlanError:
            cand, fits, gib = None, "NO", "  -  "
        best = plan(row.request).best.layout
        same = (best.tp, best.pp) == (row.published.tp, row.published.pp)
        matches += same
        perf = ""
        if cand and row.achieved:
            pairs.append((row, cand))
            pred = predicted(row, cand, DEFAULT_EFFICIENCY)
            perf = f"{row.metric} {row.achieved:.3g} vs {pred:.3g} ({100 * (pred / row.achieved - 1):+.0f}%)"
        print(f"{row.name[:34]:34s} {row.request.gpus:5d} {row.published.tp:>4d},{row.published.pp:<4d} {fits:>5s} "
              f"{gib:>5s} {best.tp:>5d},{best.pp:<4d} {'yes' if same else 'MISS':>5s}  {perf}")
    print(f"tp/pp match: {matches}/{len(rows)} = {100 * matches / len(rows):.0f}% (target 80%)")
    errors = [abs(predicted(r, c, DEFAULT_EFFICIENCY) / r.achieved - 1) for r, c in pairs]
    print(f"throughput: median |error| {100 * median(errors):.1f}% over {len(errors)} rows at eff "
          f"{DEFAULT_EFFICIENCY}")
    eff = fit_efficiency(pairs)
    loo = [abs(e) for e in leave_one_out(pairs)]
    print(f"fitted efficiency {eff:.3f}; leave-one-out median |error| {100 * median(loo):.1f}%")


def seed_claim() -> None:
    print("\n== seed claim: 100B parameters on 80 GB GPUs (A100-80GB, seq 2048, bf16, global batch >= N)")
    model = model_from_params("100B", seq_len=2048)
    base = PlanRequest(model=model, gpus=8, gpu="a100-80gb", global_batch=1024)
    for label, pins in (("plain DDP (tp=pp=1, ZeRO-0)", Pins(tp=1, pp=1, zero_stage=0)),
                        ("pure data parallel, best ZeRO (tp=pp=1)", Pins(tp=1, pp=1)),
                        ("hybrid (any layout)", Pins())):
        n, layout = min_gpus(base.replace(pins=pins))
        print(f"{label:42s}: " + (f"{n} GPUs ({layout.describe()})" if n else "does not fit on any GPU count"))


def planning_speed() -> None:
    print("\n== planning speed (70B preset, dense and MLA, global batch 2048 x 4096)")
    for attention in ("dense", "mla"):
        model = PRESETS["70b"].replace(attention=attention)
        times = {}
        for gpus in (64, 4096):
            req = PlanRequest(model=model, gpus=gpus, gpu="h100", global_batch=2048, seq_len=4096)
            t0 = time.perf_counter()
            result = plan(req)
            times[gpus] = time.perf_counter() - t0
            print(f"{attention:5s} {gpus:5d} GPUs: {times[gpus]:.3f} s, {len(result.candidates)} fitting, "
                  f"best {result.best.layout.describe()} MFU {100 * result.best.estimate.mfu:.1f}%")
        print(f"      4096/64 time ratio: {times[4096] / times[64]:.1f}x")


if __name__ == "__main__":
    published_table()
    seed_claim()
    planning_speed()
