"""Controller planning before launch: layouts per world size, auto plans the workers can run,
elastic ranges, DeepSpeed configs and progress lines (no Ray needed)."""

import json

import pytest

from orchestrator.config import JobConfig
from orchestrator.contract.checkpoints import MANIFEST, build_manifest
from orchestrator.contract.errors import PlanError
from orchestrator.contract.io import write_json_atomic
from orchestrator.contract.layout import Layout, unsupported_reason
from orchestrator.layouts import build_run_plan, check_resumable, layout_for_world, runnable_layouts
from orchestrator.progress import format_progress


def test_pinned_layout_fills_the_global_batch_with_gradient_accumulation(tiny_job):
    layout = layout_for_world(tiny_job("parallel.tensor=2"), 4)
    assert (layout.dp, layout.tp, layout.pp, layout.grad_accum) == (2, 2, 1, 2)
    assert layout.global_batch == 32


def test_pinned_layout_errors_name_the_numbers_and_the_fix(tiny_job):
    with pytest.raises(
        PlanError, match=r"parallel.tensor\(2\) \* parallel.pipeline\(1\) = 2 does not divide 3"
    ):
        layout_for_world(tiny_job("parallel.tensor=2"), 3)
    with pytest.raises(
        PlanError, match=r"global_batch\(32\) is not divisible by data-parallel degree \(3\)"
    ):
        layout_for_world(tiny_job(), 3)


@pytest.mark.parametrize("world", [1, 2, 3, 4, 6, 8])
def test_auto_plans_are_layouts_the_workers_can_run_and_resume_under_another_layout(
    world, tiny_job
):
    layout = layout_for_world(tiny_job("parallel=auto"), world)
    assert layout.world_size == world and layout.global_batch == 32
    assert unsupported_reason(layout) is None and layout.zero_stage <= 2


def test_auto_plan_for_an_impossible_worker_count_says_what_would_work(tiny_job):
    with pytest.raises(PlanError, match="set cluster.num_workers=4"):
        layout_for_world(tiny_job("parallel=auto"), 5)


def test_elastic_range_keeps_only_runnable_world_sizes_and_their_configs(tiny_job):
    job = tiny_job("cluster.min_workers=1", "cluster.num_workers=4")
    assert list(runnable_layouts(job)) == [
        1,
        2,
        4,
    ]  # 3 does not divide the global batch of 32 into 8s
    plan = build_run_plan(job)
    assert plan.world_sizes == [1, 2, 4]
    for w, ds in plan.deepspeed.items():
        assert (
            ds["train_batch_size"]
            == 32
            == (ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * w)
        )


def test_progress_line_has_step_loss_tokens_per_s_and_elapsed():
    line = format_progress(
        {"step": 40, "loss": 2.31412, "val_loss": 2.2, "tokens_per_s": 5210.4, "lr": 0.0029},
        200,
        12.3,
    )
    assert line == "step    40/200  loss 2.3141  val 2.2000  tok/s 5,210  lr 2.90e-03  12s"


def test_progress_line_shows_mfu_and_peak_memory():
    record = {"step": 40, "loss": 2.3, "mfu": 0.08431, "peak_memory_gib": 0.6123}
    line = format_progress(record, 200, 12.3)
    assert line == "step    40/200  loss 2.3000  mfu 8.43%  mem GiB 0.61  12s"


@pytest.mark.parametrize(
    "parallel, workers, reason",
    [
        ({"tensor": 3, "zero_stage": 1}, 3, r"tp\(3\) must divide n_heads\(4\)"),
        ({"pipeline": 8, "zero_stage": 1}, 8, r"pp\(8\) \* virtual_stages\(1\) > n_layers\(4\)"),
        ({"pipeline": 2, "zero_stage": 3}, 2, "zero_stage=3 with pp=2"),
    ],
)
def test_controller_rejects_unrunnable_layouts_before_launch(parallel, workers, reason):
    job = JobConfig(
        model={"preset": "tiny"},
        parallel=parallel,
        cluster={"num_workers": workers},
        train={"micro_batch": 1, "global_batch": 24},
    )
    with pytest.raises(PlanError, match=reason):
        layout_for_world(job, workers)


def _job_with_checkpoint(tmp_path, saved: Layout, **parallel) -> JobConfig:
    folder = tmp_path / "r" / "checkpoints" / "step_0000010"
    folder.mkdir(parents=True)
    (folder / "meta.json").write_text(json.dumps({"step": 10, "layout": saved.to_dict()}))
    write_json_atomic(folder / MANIFEST, build_manifest(folder))  # a complete checkpoint proves it
    return JobConfig(
        model={"preset": "tiny"},
        parallel=parallel,
        cluster={"num_workers": 1},
        train={"micro_batch": 4, "global_batch": 16},
        run={"name": "r", "dir": str(tmp_path)},
    )


def test_zero3_checkpoint_under_another_layout_is_refused_before_launch(tmp_path):
    job = _job_with_checkpoint(
        tmp_path, Layout(dp=2, zero_stage=3, micro_batch=4, grad_accum=2), zero_stage=3
    )
    with pytest.raises(PlanError, match="ZeRO-3 checkpoints load under the same layout only"):
        check_resumable(job, build_run_plan(job))


def test_layout_independent_checkpoint_resumes_under_another_layout(tmp_path):
    job = _job_with_checkpoint(
        tmp_path, Layout(dp=2, zero_stage=1, micro_batch=4, grad_accum=2), zero_stage=2
    )
    check_resumable(job, build_run_plan(job))  # dp=2 ZeRO-1 -> dp=1 ZeRO-2: allowed
