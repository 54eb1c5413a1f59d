"""Planner benchmark: published layouts, efficiency fit, the 100B seed claim, planning speed.

Run: ``.venv/bin/python benchmarks/planner.py`` (about 1.5 min on 2 cores). Prints

0. the Aleph Alpha sweeps (benchmarks/data/sweeps_aleph_alpha.csv, 964 usable runs in 10
   model/sequence/world-size groups), leave-one-group-out: per group the OOM prediction accuracy,
   Spearman's rank correlation of predicted and measured throughput among the runs that fit, and
   the top-pick regret, for the counted model before calibration and for the calibrated one; the
   constants fitted on all groups next to ``constants.CALIBRATED``; the residual band;

1. every usable row of benchmarks/data/published_layouts.csv: the published (tp, pp), whether
   it is predicted to fit, the planner's best (tp, pp) under the same constraints (GPUs, batch,
   precision, recompute policy, the framework's ZeRO stages) and the achieved vs predicted
   throughput; for each miss, the published mesh's predicted speed relative to the fastest;
2. the efficiency fitted to those rows, with in-sample and leave-one-out median errors;
2b. the tie-break sweep (tie tolerance x comfortable memory fraction) and a leave-one-out check of
   choosing those two numbers on the same rows;
3. the smallest number of 80 GB GPUs for a 100B-parameter model with pure data parallelism
   (tp = pp = 1, any ZeRO stage; and plain DDP) versus any hybrid layout;
4. the time to plan a 70B model on 4,096 GPUs, next to planning 64 GPUs in the same run.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

from mla.config import PRESETS
from orchestrator.contract.errors import PlanError
from orchestrator.planner import Pins, PlanRequest, min_gpus, model_from_params, plan
from orchestrator.planner.calibrate import (
    fit_efficiency,
    leave_one_out,
    load_published,
    median,
    predicted,
    published_candidate,
)
from orchestrator.planner.search import COMFORTABLE_MEMORY_FRACTION, TIE_TOLERANCE, rank
from orchestrator.planner.step_time import DEFAULT_EFFICIENCY

CSV = Path(__file__).resolve().parent / "data" / "published_layouts.csv"
SWEEPS = CSV.parent / "sweeps_aleph_alpha.csv"


def _fmt_regret(r: float) -> str:
    return "OOM pick" if r == float("inf") else f"{100 * r:5.1f}%"


def _summary(scores: list) -> str:
    runs = sum(s.runs for s in scores)
    pooled = sum(s.oom_accuracy * s.runs for s in scores) / runs
    rhos = [s.spearman for s in scores]
    regrets = [s.regret for s in scores]
    return (
        f"OOM accuracy {100 * pooled:.1f}% pooled (per-group median {100 * median([s.oom_accuracy for s in scores]):.1f}%, "
        f"min {100 * min(s.oom_accuracy for s in scores):.1f}%); Spearman median {median(rhos):.2f} "
        f"(min {min(rhos):.2f}); regret median {_fmt_regret(median(regrets))}, worst {_fmt_regret(max(regrets))}"
    )


def sweeps_table() -> None:
    """Section 0: leave-one-group-out on the Aleph Alpha sweeps, before and after calibration."""
    from orchestrator.planner.constants import CALIBRATED, COUNTED
    from orchestrator.planner.fit import (
        fit_constants,
        leave_one_group_out,
        residual_band,
        score_group,
    )
    from orchestrator.planner.sweeps import groups, load_sweeps

    runs = load_sweeps(SWEEPS)
    print(
        f"== Aleph Alpha sweeps: {len(runs)} runs ({sum(r.oom for r in runs)} OOM) in {len(groups(runs))} groups; "
        "targets: OOM >= 95%, Spearman median >= 0.8, regret median <= 5%, worst <= 15%"
    )
    plain = [
        r.__class__(
            r.group,
            r.request.replace(kernel="flash2+rms", fused_loss=True),
            r.layout,
            r.kernel,
            r.step_time_s,
        )
        for r in runs
    ]
    before = [score_group(rs, COUNTED) for rs in groups(plain).values()]
    after = leave_one_group_out(runs)
    print(
        f"{'group':24s} {'runs':>4s} {'fit':>4s} | {'before: OOM acc':>15s} {'Spearman':>8s} {'regret':>8s} | "
        f"{'LOGO: OOM acc':>13s} {'Spearman':>8s} {'regret':>8s}  pick (LOGO)"
    )
    for b, a in zip(before, after, strict=False):
        print(
            f"{a.group:24s} {a.runs:4d} {a.measured:4d} | {100 * b.oom_accuracy:14.1f}% {b.spearman:8.2f} "
            f"{_fmt_regret(b.regret):>8s} | {100 * a.oom_accuracy:12.1f}% {a.spearman:8.2f} {_fmt_regret(a.regret):>8s}"
            f"  {a.pick}"
        )
    print("before (counted model, no kernel traits): " + _summary(before))
    print("after (leave-one-group-out):              " + _summary(after))
    fitted = fit_constants(runs)
    print(f"fitted on all groups: {fitted}")
    print(f"constants.CALIBRATED: {CALIBRATED}")
    low, high, rel = residual_band(after)
    print(
        f"held-out residual band log(measured/predicted): central 80% [{low:+.3f}, {high:+.3f}] "
        f"(x{math.exp(low):.2f}..x{math.exp(high):.2f}); between layouts of one job +-{100 * rel:.1f}%\n"
    )


def miss_note(row, result) -> str:
    """For a miss: the published mesh's best predicted speed relative to the chosen layout."""
    pub = [
        c
        for c in result.candidates
        if (c.layout.tp, c.layout.pp) == (row.published.tp, row.published.pp)
    ]
    if not pub:
        return "published mesh not among fitting candidates"
    best, top = result.best.estimate, max(pub, key=lambda c: c.estimate.tokens_per_s).estimate
    return (
        f"published mesh {100 * (top.tokens_per_s / best.tokens_per_s - 1):+.1f}% tokens/s, "
        f"{top.memory.total / 2**30:.0f} vs {best.memory.total / 2**30:.0f} GiB"
    )


def published_table() -> list:
    rows, skipped = load_published(CSV)
    print(
        f"== published layouts: {len(rows)} usable rows, {len(skipped)} skipped "
        f"(missing dims/batch, MoE/CP, TPU/H800)"
    )
    print(
        f"{'model':34s} {'GPUs':>5s} {'pub tp,pp':>9s} {'fits':>5s} {'GiB':>5s} {'best tp,pp':>10s} "
        f"{'match':>5s}  achieved vs predicted (eff {DEFAULT_EFFICIENCY})"
    )
    pairs, matches, results, misses = [], 0, [], []
    for row in rows:
        try:
            cand = published_candidate(row)
            fits, gib = "yes", f"{cand.estimate.memory.total / 2**30:5.1f}"
        except PlanError:
            cand, fits, gib = None, "NO", "  -  "
        result = plan(row.request)
        results.append((row, result.candidates))
        best = result.best.layout
        same = (best.tp, best.pp) == (row.published.tp, row.published.pp)
        matches += same
        if not same:
            misses.append(
                f"  {row.name[:34]:34s} {row.request.gpus:5d} GPUs: chose {best.describe()}; "
                + miss_note(row, result)
            )
        perf = ""
        if cand and row.achieved:
            pairs.append((row, cand))
            pred = predicted(row, cand, DEFAULT_EFFICIENCY)
            perf = f"{row.metric} {row.achieved:.3g} vs {pred:.3g} ({100 * (pred / row.achieved - 1):+.0f}%)"
        print(
            f"{row.name[:34]:34s} {row.request.gpus:5d} {row.published.tp:>4d},{row.published.pp:<4d} {fits:>5s} "
            f"{gib:>5s} {best.tp:>5d},{best.pp:<4d} {'yes' if same else 'MISS':>5s}  {perf}"
        )
    print(
        f"tp/pp match: {matches}/{len(rows)} = {100 * matches / len(rows):.0f}% (target 80%); misses:"
    )
    print("\n".join(misses))
    errors = [abs(predicted(r, c, DEFAULT_EFFICIENCY) / r.achieved - 1) for r, c in pairs]
    print(
        f"throughput: median |error| {100 * median(errors):.1f}% over {len(errors)} rows at eff "
        f"{DEFAULT_EFFICIENCY}"
    )
    eff = fit_efficiency(pairs)
    loo = [abs(e) for e in leave_one_out(pairs)]
    fitted = [abs(predicted(r, c, eff) / r.achieved - 1) for r, c in pairs]
    print(
        f"fitted efficiency {eff:.3f}: in-sample median |error| {100 * median(fitted):.1f}%; "
        f"leave-one-out median |error| {100 * median(loo):.1f}%"
    )
    return results


TOLERANCES = (0.0, 0.03, 0.05, 0.07, 0.10)
COMFORT = (0.7, 0.75, 0.8, 0.85, 0.9, 1.0)


def tie_break_sweep(results: list) -> None:
    """Matches for each (tolerance, comfortable fraction), and leave-one-out over that choice."""
    hit = {
        (t, f): [
            (lambda b: (b.tp, b.pp))(rank(cands, t, f)[0].layout)
            == (r.published.tp, r.published.pp)
            for r, cands in results
        ]
        for t in TOLERANCES
        for f in COMFORT
    }
    print(
        f"\n== tie-break sweep: tp/pp matches of {len(results)} rows (chosen: tolerance {TIE_TOLERANCE}, "
        f"comfortable memory fraction {COMFORTABLE_MEMORY_FRACTION})"
    )
    print("tolerance \\ fraction " + " ".join(f"{f:>5g}" for f in COMFORT))
    for t in TOLERANCES:
        print(f"{t:>20g} " + " ".join(f"{sum(hit[t, f]):>5d}" for f in COMFORT))

    def choose(held_out: int) -> tuple:
        score = {k: sum(v) - (v[held_out] if held_out >= 0 else 0) for k, v in hit.items()}
        top = max(score.values())
        return max((k for k, v in score.items() if v == top), key=lambda k: (k[1], -k[0]))

    chosen = choose(-1)
    loo = sum(hit[choose(i)][i] for i in range(len(results)))
    print(
        f"selection rule (most matches; then largest fraction, smallest tolerance) picks {chosen}; "
        f"leave-one-out over that selection: {loo}/{len(results)} = {100 * loo / len(results):.0f}%"
    )


def seed_claim() -> None:
    print(
        "\n== seed claim: 100B parameters on 80 GB GPUs (A100-80GB, seq 2048, bf16, global batch >= N)"
    )
    model = model_from_params("100B", seq_len=2048)
    base = PlanRequest(model=model, gpus=8, gpu="a100-80gb", global_batch=1024)
    for label, pins, stages in (
        ("plain DDP (tp=pp=1, ZeRO-0)", Pins(tp=1, pp=1, zero_stage=0), None),
        ("pure data parallel, best ZeRO (tp=pp=1)", Pins(tp=1, pp=1), None),
        ("pure data parallel, ZeRO <= 1 (Megatron-style)", Pins(tp=1, pp=1), (0, 1)),
        ("hybrid, ZeRO <= 1 (Megatron-style)", Pins(), (0, 1)),
        ("hybrid (any layout)", Pins(), None),
    ):
        n, layout = min_gpus(base.replace(pins=pins, allowed_zero_stages=stages))
        print(
            f"{label:48s}: "
            + (f"{n} GPUs ({layout.describe()})" if n else "does not fit on any GPU count")
        )


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
            print(
                f"{attention:5s} {gpus:5d} GPUs: {times[gpus]:.3f} s, {len(result.candidates)} fitting, "
                f"best {result.best.layout.describe()} MFU {100 * result.best.estimate.mfu:.1f}%"
            )
        print(f"      4096/64 time ratio: {times[4096] / times[64]:.1f}x")


if __name__ == "__main__":
    sweeps_table()
    tie_break_sweep(published_table())
    seed_claim()
    planning_speed()
