"""Controller planning before launch: layouts per world size, auto plans the workers can run,
elastic ranges, DeepSpeed configs and progress lines (no Ray needed)."""

import pytest

from orchestrator.config import load_job_config
from orchestrator.controller import build_worker_plans, format_progress, layout_for_world, world_sizes
from orchestrator.errors import PlanError
from workers.parallel.support import unsupported_reason


def tiny(*overrides):
    return load_job_config("configs/tiny.yaml", list(overrides))


def test_pinned_layout_fills_the_global_batch_with_gradient_accumulation():
    layout = layout_for_world(tiny("parallel.tensor=2"), 4)
    assert (layout.dp, layout.tp, layout.pp, layout.grad_accum) == (2, 2, 1, 2)
    assert layout.global_batch == 32


def test_pinned_layout_errors_name_the_numbers_and_the_fix():
    with pytest.raises(PlanError, match=r"parallel.tensor\(2\) \* parallel.pipeline\(1\) = 2 does not divide 3"):
        layout_for_world(tiny("parallel.tensor=2"), 3)
    with pytest.raises(PlanError, match=r"global_batch\(32\) is not divisible by data-parallel degree \(3\)"):
        layout_for_world(tiny(), 3)
    with pytest.raises(PlanError, match=r"tp\(8\) must divide n_heads\(4\)"):
        layout_for_world(tiny("parallel.tensor=8"), 8)
    with pytest.raises(PlanError, match="pipeline engine supports ZeRO stage 0 or 1"):
        layout_for_world(tiny("parallel.pipeline=2", "parallel.zero_stage=3"), 2)
    with pytest.raises(PlanError, match=r"pp\(8\) \* virtual_stages\(1\) > n_layers\(4\)"):
        layout_for_world(tiny("parallel.pipeline=8", "parallel.zero_stage=1"), 8)


@pytest.mark.parametrize("world", [1, 2, 3, 4, 6, 8])
def test_auto_plans_are_layouts_the_workers_can_run_and_resume_under_another_layout(world):
    layout = layout_for_world(tiny("parallel=auto"), world)
    assert layout.world_size == world and layout.global_batch == 32
    assert unsupported_reason(layout) is None and layout.zero_stage <= 2


def test_auto_plan_for_an_impossible_worker_count_says_what_would_work():
    with pytest.raises(PlanError, match="set cluster.num_workers=4"):
        layout_for_world(tiny("parallel=auto"), 5)


def test_elastic_range_keeps_only_runnable_world_sizes_and_their_configs():
    job = tiny("cluster.min_workers=1", "cluster.num_workers=4")
    assert world_sizes(job) == [1, 2, 4]  # 3 does not divide the global batch of 32 into 8s
    plans = build_worker_plans(job)
    for w, plan in plans.items():
        ds = plan["deepspeed"]
        assert ds["train_batch_size"] == 32 == (ds["train_micro_batch_size_per_gpu"]
                                                * ds["gradient_accumulation_steps"] * int(w))


def test_progress_line_has_step_loss_tokens_per_s_and_elapsed():
    line = format_progress({"step": 40, "loss": 2.31412, "val_loss": 2.2, "tokens_per_s": 5210.4, "lr": 0.0029},
                           200, 12.3)
    assert line == "step    40/200  loss 2.3141  val 2.2000  tok/s 5,210  lr 2.90e-03  12s"
