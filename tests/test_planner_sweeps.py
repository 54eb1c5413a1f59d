"""The Aleph Alpha sweeps as calibration data: loading, the calibrated constants' effect on
hand-checked runs, the fit that produced them, intervals and close calls.

Leave-one-group-out numbers are benchmark output (``benchmarks/planner.py``, README), not tests.
"""

import filecmp
import math
from pathlib import Path

import pytest

from mla.config import PRESETS
from orchestrator.planner import PlanRequest, estimate, plan
from orchestrator.planner.constants import CALIBRATED, COUNTED
from orchestrator.planner.fit import fit_constants, memory_terms
from orchestrator.planner.memory import calibrated_extra_bytes
from orchestrator.planner.step_time import tp_comm_per_micro_batch
from orchestrator.planner.sweeps import groups, load_sweeps

FIXTURES = Path(__file__).resolve().parents[1] / "benchmarks" / "data"
SHARED = (
    Path(__file__).resolve().parents[1]
    / ".."
    / "shared"
    / "anchors"
    / "planner"
    / "sweeps_aleph_alpha.csv"
)


@pytest.fixture(scope="module")
def runs():
    return load_sweeps(FIXTURES / "sweeps_aleph_alpha.csv")


def find(runs, group, kernel, tp, pp, mb, recompute):
    return next(
        r
        for r in runs
        if r.group == group
        and r.kernel == kernel
        and (r.layout.tp, r.layout.pp, r.layout.micro_batch, r.layout.recompute)
        == (tp, pp, mb, recompute)
    )


def test_fixture_rows_and_groups(runs):
    # 984 rows, minus 19 "Kernel not available" and 1 "Other Error"
    assert len(runs) == 964 and sum(r.oom for r in runs) == 563
    assert len(groups(runs)) == 10
    assert {r.request.global_batch * r.request.seq_len for r in runs} == {2048 * 2048}


@pytest.mark.skipif(not SHARED.exists(), reason="shared anchors not checked out here")
def test_fixture_is_the_shared_copy():
    assert filecmp.cmp(FIXTURES / "sweeps_aleph_alpha.csv", SHARED, shallow=False)


def test_loss_and_transient_bytes_by_hand(runs):
    # 13B at 8k, tp=4 pp=4 mb=4 full recompute, flash2 (unfused RMSNorm: 16 B per sbh replicated):
    # one layer's full activations (8 + 16) sbh replicated + (4 + 4 + 6*13824/5120) sbh / 4
    run = find(runs, "LLaMA 13B 8k 128 GPUs", "flash_attention2", 4, 4, 4, "full")
    sbh = 8192 * 4 * 5120
    layer = (8 + 16) * sbh + (4 + 4 + 6 * 13824 / 5120) * sbh / 4
    got = calibrated_extra_bytes(
        run.request.model, 8192, run.layout, 3, True, 16, CALIBRATED, fused_loss=False
    )
    assert got == pytest.approx(
        CALIBRATED.transient_layers * layer + CALIBRATED.loss_bytes_per_logit * 8192 * 4 * 32000
    )


def test_calibrated_memory_predicts_an_oom_the_counted_model_misses(runs):
    run = find(runs, "LLaMA 13B 8k 128 GPUs", "flash_attention2", 4, 4, 4, "full")
    assert run.oom
    assert estimate(run.request.replace(constants=COUNTED), run.layout).fits  # ~21 GiB counted
    assert not estimate(run.request, run.layout).fits


def test_slow_tensor_parallel_link_reorders_layouts_as_measured(runs):
    # measured: tp=4 pp=1 takes 32.6 s, tp=1 pp=4 26.3 s; the counted model had them the other way
    tp4 = find(runs, "LLaMA 13B 8k 128 GPUs", "flash_attention2", 4, 1, 1, "full")
    pp4 = find(runs, "LLaMA 13B 8k 128 GPUs", "flash_attention2", 1, 4, 1, "full")
    assert tp4.step_time_s > pp4.step_time_s
    t = {
        c: [estimate(r.request.replace(constants=c), r.layout).step_time_s for r in (tp4, pp4)]
        for c in (COUNTED, CALIBRATED)
    }
    assert t[COUNTED][0] < t[COUNTED][1]
    assert t[CALIBRATED][0] > t[CALIBRATED][1]


def test_tp_link_fraction_scales_the_bandwidth_term():
    from orchestrator.contract.layout import Layout

    lay = Layout(dp=8, tp=4, pp=1, zero_stage=1, micro_batch=1, grad_accum=8)
    req = PlanRequest(model=PRESETS["13b"], gpus=32, gpu="a100-80gb", global_batch=64, seq_len=2048)
    full = tp_comm_per_micro_batch(req.model, 2048, lay, "bf16", req.gpu, link_fraction=1.0)
    slow = tp_comm_per_micro_batch(req.model, 2048, lay, "bf16", req.gpu, link_fraction=0.2)
    # 4 all-reduces per layer x 40 layers of 2*2048*5120 bytes, ring 2*(3/4) of it at 300 GB/s:
    # the bandwidth term grows 5x, the latency term stays
    bandwidth = 4 * 40 * 2 * 0.75 * 2 * 2048 * 5120 / 300e9
    assert slow - full == pytest.approx(4 * bandwidth)


def test_unfused_attention_is_slower_as_measured(runs):
    torch_run = find(runs, "LLaMA 13B 8k 128 GPUs", "torch", 1, 2, 1, "full")
    flash = find(runs, "LLaMA 13B 8k 128 GPUs", "flash_attention2", 1, 2, 1, "full")
    assert torch_run.step_time_s / flash.step_time_s > 1.8  # 55.1 s vs 24.6 s
    ratio = (
        estimate(torch_run.request, torch_run.layout).step_time_s
        / estimate(flash.request, flash.layout).step_time_s
    )
    assert ratio > 1.3


def test_memory_terms_reproduce_the_estimate(runs):
    c = CALIBRATED
    for run in runs[::97]:
        total = max(
            f + c.activation_scale * a + c.transient_layers * lay + c.loss_bytes_per_logit * lg
            for f, a, lay, lg in memory_terms(run)
        )
        assert total == pytest.approx(estimate(run.request, run.layout).memory.total)


def test_fit_on_all_groups_gives_the_calibrated_constants(runs):
    fitted = fit_constants(runs)
    assert (
        fitted.replace(
            step_time_band=CALIBRATED.step_time_band, relative_error=CALIBRATED.relative_error
        )
        == CALIBRATED
    )


def test_step_time_interval_comes_from_the_residual_band():
    est = plan(PlanRequest(model=PRESETS["7b"], gpus=16, gpu="h100", global_batch=64)).best.estimate
    low, high = CALIBRATED.step_time_band
    assert est.step_time_interval_s == pytest.approx(
        (est.step_time_s * math.exp(low), est.step_time_s * math.exp(high))
    )
    assert (
        est.to_dict()["step_time_interval_s"][0]
        < est.step_time_s
        < est.to_dict()["step_time_interval_s"][1]
    )


def test_close_call_names_both_estimate_commands():
    result = plan(PlanRequest(model=PRESETS["7b"], gpus=16, gpu="h100", global_batch=64))
    other = next(
        c
        for c in result.candidates
        if (c.layout.dp, c.layout.tp, c.layout.pp)
        != (result.best.layout.dp, result.best.layout.tp, result.best.layout.pp)
    )
    gap = abs(math.log(other.estimate.step_time_s / result.best.estimate.step_time_s))
    assert (gap < CALIBRATED.relative_error) == bool(result.close_call)
    if result.close_call:
        assert (
            result.close_call.count("mla plan --estimate") == 2
            and "mla plan --measure" in result.close_call
        )
    wide = plan(
        PlanRequest(
            model=PRESETS["7b"],
            gpus=16,
            gpu="h100",
            global_batch=64,
            constants=CALIBRATED.replace(relative_error=1.0),
        )
    )
    assert "measure both" in wide.close_call
    assert not plan(
        PlanRequest(
            model=PRESETS["7b"],
            gpus=16,
            gpu="h100",
            global_batch=64,
            constants=CALIBRATED.replace(relative_error=0.0),
        )
    ).close_call
