"""Planner step-time and FLOP accounting: bubble, ring collectives, MFU worked checks."""

import pytest

from mla.config import ModelConfig
from orchestrator.contract.layout import Layout
from orchestrator.planner import Pins, PlanRequest, estimate, plan
from orchestrator.planner.step_time import ring_time, stage_flops_per_token

GPT1T = ModelConfig(
    vocab_size=51200,
    d_model=25600,
    n_layers=128,
    n_heads=160,
    ffn_hidden=68267,
    max_seq_len=2048,
    attention="dense",
)


def _req(**kw):
    base = dict(model=GPT1T, gpus=3072, gpu="a100-80gb", global_batch=3072, precision="fp16")
    return PlanRequest(**{**base, **kw})


def test_bubble_is_p_minus_1_over_v_m():
    # Megatron 1T: p=64, m=512 micro-batches -> bubble 63/512 of the ideal time (formulas.md §4)
    lay = Layout(dp=6, tp=8, pp=64, zero_stage=1, micro_batch=1, grad_accum=512, recompute="full")
    t = estimate(_req(), lay).time
    per_mb = (t.compute_s + t.recompute_s + t.tp_comm_s) / 512
    assert t.bubble_s / (per_mb * 512) == pytest.approx(63 / 512)


def test_interleaving_divides_bubble_by_v():
    cfg = GPT1T.replace(n_layers=128)
    lay = Layout(dp=6, tp=8, pp=64, zero_stage=1, micro_batch=1, grad_accum=512, recompute="full")
    one = estimate(_req(model=cfg), lay).time.bubble_s
    two = estimate(_req(model=cfg), lay.replace(virtual_stages=2)).time.bubble_s
    assert two == pytest.approx(one / 2)


def test_ring_allreduce_volume():
    assert ring_time(1e9, 8, 25.0, 2, pieces=0) == pytest.approx(2 * 7 / 8 * 1e9 / 25e9)
    assert ring_time(1e9, 1, 25.0, 2) == 0.0


def test_full_recompute_adds_one_third_of_layer_flops():
    model, extra = stage_flops_per_token(GPT1T, 2048, 1, "full")
    head = 6 * 51200 * 25600
    assert extra == pytest.approx((model - head) / 3)


def test_selective_hfu_mfu_ratio_matches_korthikanti():
    # formulas.md §5 check 4: (1+s/3h+V/12hL)/(1+s/6h+V/12hL) = 1.013 for the 1T model
    cfg = GPT1T.replace(ffn_hidden=round(8 * 25600 / 3))
    model, extra = stage_flops_per_token(cfg, 2048, 1, "selective")
    assert (model + extra) / model == pytest.approx(1.013, abs=0.002)


def test_mfu_is_model_flops_over_peak():
    lay = Layout(dp=6, tp=8, pp=64, zero_stage=1, micro_batch=1, grad_accum=512, recompute="full")
    est = estimate(_req(), lay)
    assert est.mfu == pytest.approx(est.tflops_per_gpu / 312)
    assert est.hfu > est.mfu
    assert est.tokens_per_s == pytest.approx(3072 * 2048 / est.step_time_s)


def test_megatron_eq3_iteration_time_example():
    # formulas.md §5 check 2: 5.14e19 FLOP/iteration at 163 TF x 3072 GPUs -> 102.6 s
    B, s, n_layers, h, V = 3072, 2048, 128, 25600, 51200
    flops = 96 * B * s * n_layers * h**2 * (1 + s / (6 * h) + V / (16 * n_layers * h))
    assert flops == pytest.approx(5.14e19, rel=0.005)
    assert flops / (163e12 * 3072) == pytest.approx(102.6, rel=0.005)


def test_more_memory_bandwidth_never_slows_a_step():
    lay = Layout(dp=6, tp=8, pp=64, zero_stage=1, micro_batch=1, grad_accum=512, recompute="full")
    slow = estimate(_req(), lay).step_time_s
    fast = estimate(_req(gpu=_req().gpu.replace(hbm_tbs=10.0)), lay).step_time_s
    assert fast < slow


def test_estimate_mode_reports_not_fitting_layout():
    pins = Pins(
        dp=1,
        tp=1,
        pp=1,
        zero_stage=0,
        micro_batch=1,
        recompute="none",
        sequence_parallel=False,
        virtual_stages=1,
    )
    result = plan(_req(gpus=1, global_batch=8, pins=pins))
    assert result.estimate is not None and not result.estimate.estimate.fits
    assert "GiB >" in result.estimate.estimate.reason
    doc = result.to_json()["estimate"]
    assert doc["estimate"]["fits"] is False and doc["layout"]["dp"] == 1


LLAMA8B = ModelConfig(
    vocab_size=128000,
    d_model=4096,
    n_layers=32,
    n_heads=32,
    n_kv_heads=8,
    ffn_hidden=14336,
    max_seq_len=8192,
    attention="dense",
)


def test_zero3_gathers_are_exposed_once_they_outgrow_forward_compute():
    # ZeRO-3 gathers parameters in forward and again in backward (ZeRO §7: 1.5x the DP volume): on
    # 1,024 GPUs with one short sequence each, the gathers outgrow the compute and are exposed,
    # while on 64 GPUs with 8K tokens each they hide behind it.
    small = Layout(dp=1024, tp=1, pp=1, zero_stage=3, micro_batch=1, grad_accum=1)
    big = Layout(dp=64, tp=1, pp=1, zero_stage=3, micro_batch=1, grad_accum=1)
    short = PlanRequest(model=LLAMA8B, gpus=1024, gpu="h100", global_batch=1024, seq_len=512)
    long = PlanRequest(model=LLAMA8B, gpus=64, gpu="h100", global_batch=64, seq_len=8192)
    t_short, t_long = estimate(short, small).time, estimate(long, big).time
    assert t_short.dp_comm_s > 0.5 * t_short.compute_s
    assert t_long.dp_comm_s < 0.05 * t_long.compute_s


def test_zero3_moves_more_exposed_traffic_than_zero1_per_step():
    lay1 = Layout(dp=256, tp=1, pp=1, zero_stage=1, micro_batch=1, grad_accum=4)
    req = PlanRequest(model=LLAMA8B, gpus=256, gpu="a100-80gb", global_batch=1024, seq_len=1024)
    assert (
        estimate(req, lay1.replace(zero_stage=3)).time.dp_comm_s
        > estimate(req, lay1).time.dp_comm_s
    )


def test_tp_comm_overlap_leaves_one_chunk_in_tp_exposed():
    lay = Layout(dp=6, tp=8, pp=64, zero_stage=1, micro_batch=1, grad_accum=512, recompute="full")
    plain = estimate(_req(), lay).time.tp_comm_s
    assert estimate(_req(overlap_tp=True), lay).time.tp_comm_s == pytest.approx(plain / 8)


def test_param_gather_overlap_hides_the_zero1_all_gather():
    lay = Layout(dp=64, tp=1, pp=1, zero_stage=1, micro_batch=1, grad_accum=4)
    req = PlanRequest(model=LLAMA8B, gpus=64, gpu="h100", global_batch=256, seq_len=8192)
    assert estimate(req, lay).time.dp_comm_s > 0
    assert (
        estimate(req.replace(overlap_param_gather=True), lay).time.dp_comm_s
        < estimate(req, lay).time.dp_comm_s
    )
