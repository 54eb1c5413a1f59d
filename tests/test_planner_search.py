"""Planner search, errors, pins, catalogue, shape rules and the controller API (plan_job)."""

import pytest

from mla.config import PRESETS
from mla.flops import count_parameters
from orchestrator.config import validate_job_dict
from orchestrator.contract.errors import PlanError
from orchestrator.planner import (
    Pins,
    PlanRequest,
    get_gpu,
    min_gpus,
    model_from_params,
    parse_count,
    plan,
    plan_job,
)


def test_every_candidate_respects_the_rules():
    req = PlanRequest(model=PRESETS["7b"], gpus=16, gpu="h100", global_batch=64)
    result = plan(req)
    for c in result.candidates:
        lay = c.layout
        assert lay.world_size == 16 and lay.global_batch == 64 and lay.tp <= 8
        assert 32 % lay.tp == 0 and not (lay.pp > 1 and lay.zero_stage > 1)
        assert c.estimate.fits
    speeds = [c.estimate.tokens_per_s for c in result.candidates[1:]]
    assert speeds == sorted(speeds, reverse=True)


def test_pins_restrict_the_search():
    req = PlanRequest(
        model=PRESETS["7b"], gpus=16, gpu="h100", global_batch=64, pins=Pins(tp=2, recompute="full")
    )
    assert {(c.layout.tp, c.layout.recompute) for c in plan(req).candidates} == {(2, "full")}


def test_zero_gpus_is_a_plan_error():
    with pytest.raises(PlanError, match="gpus=0"):
        PlanRequest(model=PRESETS["tiny"], gpus=0)


def test_more_tensor_parallelism_than_heads():
    req = PlanRequest(model=PRESETS["tiny"], gpus=8, gpu="cpu", global_batch=32, pins=Pins(tp=8))
    with pytest.raises(PlanError, match="tp=8 does not divide heads=4"):
        plan(req)


def test_batch_no_layout_divides():
    req = PlanRequest(
        model=PRESETS["tiny"], gpus=8, gpu="cpu", global_batch=7, pins=Pins(tp=1, pp=1)
    )
    with pytest.raises(PlanError, match="not divisible by dp=8.*\n.*fix: use a global batch"):
        plan(req)


def test_model_that_fits_nowhere_names_the_minimum_gpu_count():
    req = PlanRequest(
        model=model_from_params("100B", seq_len=2048), gpus=8, gpu="a100-80gb", global_batch=64
    )
    with pytest.raises(PlanError, match=r"smallest GPU count that fits is \d+"):
        plan(req)


def test_min_gpus_is_minimal():
    req = PlanRequest(
        model=model_from_params("100B", seq_len=2048), gpus=8, gpu="a100-80gb", global_batch=64
    )
    n, layout = min_gpus(req)
    assert layout is not None and layout.world_size == n
    with pytest.raises(PlanError):
        plan(req.replace(gpus=n - 8, global_batch=8 * (n - 8)))


def test_unknown_gpu_lists_known_ones():
    with pytest.raises(PlanError, match="known GPUs: a100-40gb, a100-80gb, h100"):
        get_gpu("b300")


def test_custom_gpu_values_and_unsupported_precision():
    assert get_gpu("h100", memory_gib=94).memory_gib == 94
    with pytest.raises(PlanError, match="t4 has no bf16"):
        get_gpu("t4").peak_flops("bf16")


@pytest.mark.parametrize("text,value", [("70B", 70e9), ("1.5t", 1.5e12), ("350M", 350e6)])
def test_parse_count(text, value):
    assert parse_count(text) == value


@pytest.mark.parametrize("target", ["1B", "7B", "70B", "100B"])
def test_shape_rule_hits_the_parameter_count(target):
    cfg = model_from_params(target)
    assert count_parameters(cfg) == pytest.approx(parse_count(target), rel=0.05)
    assert cfg.n_heads % 8 == 0 and cfg.head_dim == 128


@pytest.mark.parametrize("world", range(1, 9))
def test_plan_job_tiny_on_any_cpu_world_size(world):
    job = validate_job_dict(
        {
            "model": {"preset": "tiny"},
            "parallel": {"zero_stage": 2},
            "train": {"micro_batch": 8, "global_batch": 32},
        }
    )
    result = plan_job(job, world)
    lay = result.best.layout
    assert lay.zero_stage == 2 and lay.micro_batch == 8 and lay.global_batch == 32
    assert lay.world_size <= world
    assert (lay.world_size == world) == (not result.notes)
    lay.check_model(4, 4, 4)


@pytest.mark.parametrize("world", [0, -1])
def test_plan_job_without_workers_is_a_plan_error(world):
    # Used to end in `raise None` (TypeError: exceptions must derive from BaseException).
    job = validate_job_dict({"model": {"preset": "tiny"}})
    with pytest.raises(PlanError, match=rf"world_size={world} workers; at least 1"):
        plan_job(job, world)


def test_plan_job_pins_explicit_parallel_fields():
    job = validate_job_dict(
        {"model": {"preset": "tiny"}, "parallel": {"tensor": 2, "zero_stage": 1}}
    )
    lay = plan_job(job, 4).best.layout
    assert (lay.tp, lay.zero_stage, lay.dp) == (2, 1, 2)


def test_to_json_has_the_documented_fields():
    doc = plan(PlanRequest(model=PRESETS["tiny"], gpus=4, gpu="cpu", global_batch=32)).to_json()
    assert set(doc["best"]["layout"]) >= {
        "dp",
        "tp",
        "pp",
        "micro_batch",
        "grad_accum",
        "zero_stage",
        "recompute",
        "sequence_parallel",
        "virtual_stages",
    }
    assert set(doc["best"]["estimate"]) >= {
        "memory_gib",
        "fits",
        "step_time_s",
        "tokens_per_s",
        "tflops_per_gpu",
        "mfu",
    }
    assert set(doc["best"]["estimate"]["memory_gib"]) == {
        "parameters",
        "gradients",
        "optimizer",
        "activations",
        "buffers",
        "total",
    }
    assert doc["candidates"][0] == doc["best"]


def test_allowed_zero_stages_restrict_the_search():
    req = PlanRequest(
        model=PRESETS["7b"], gpus=16, gpu="h100", global_batch=64, allowed_zero_stages=(0, 1)
    )
    assert {c.layout.zero_stage for c in plan(req).candidates} <= {0, 1}
    assert 3 in {
        c.layout.zero_stage for c in plan(req.replace(allowed_zero_stages=None)).candidates
    }


@pytest.mark.parametrize(
    "stages,pins,match",
    [
        ((), Pins(), "non-empty set of ZeRO stages"),
        ((0, 4), Pins(), "allowed_zero_stages=\\(0, 4\\)"),
        ((0, 1), Pins(zero_stage=3), "pinned zero_stage=3 is not in"),
    ],
)
def test_bad_allowed_zero_stages_are_plan_errors(stages, pins, match):
    with pytest.raises(PlanError, match=match):
        PlanRequest(model=PRESETS["7b"], gpus=16, gpu="h100", allowed_zero_stages=stages, pins=pins)


def test_tie_break_prefers_room_then_small_model_parallel_size_then_tensor_parallelism():
    from orchestrator.planner.search import preference, rank

    best = plan(PlanRequest(model=PRESETS["7b"], gpus=16, gpu="h100", global_batch=64)).best
    lay, est = best.layout, best.estimate

    def cand(dp, tp, pp, gib):
        mem = est.memory.__class__(0, 0, 0, 0, gib * 2**30)
        layout = lay.replace(
            dp=dp, tp=tp, pp=pp, zero_stage=1, virtual_stages=1, sequence_parallel=True
        )
        return best.__class__(layout, est.__class__(**{**est.__dict__, "memory": mem}))

    roomy_tp, roomy_pp, small_mp, full = (
        cand(2, 8, 1, 40),
        cand(2, 4, 2, 40),
        cand(4, 4, 1, 40),
        cand(8, 2, 1, 79),
    )
    assert sorted([roomy_pp, roomy_tp], key=preference)[0] is roomy_tp
    assert sorted([roomy_tp, small_mp], key=preference)[0] is small_mp
    assert (
        rank([full, roomy_tp])[0] is roomy_tp
    )  # equal speed: the layout near the memory limit loses
