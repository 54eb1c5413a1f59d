"""``mla plan --measure``: candidate jobs and a real measured run of the tiny model on 2 workers."""

import json
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from orchestrator.cli_plan import plan as plan_command
from orchestrator.config import load_job_config
from orchestrator.planner import PlanRequest, plan
from orchestrator.planner.job import job_precision
from orchestrator.planner.measure import candidate_job, runnable_candidates

app = typer.Typer()
app.command("plan")(plan_command)
app.command("noop")(lambda: None)


@pytest.fixture
def tiny(tmp_path):
    text = (
        (Path(__file__).parents[1] / "configs" / "tiny.yaml")
        .read_text()
        .replace("  dir: runs", f"  dir: {tmp_path}")
    )
    path = tmp_path / "tiny.yaml"
    path.write_text(text)
    return path


def test_candidate_job_pins_the_layout_in_its_own_run_folder(tiny):
    job = load_job_config(tiny)
    result = plan(
        PlanRequest(
            model=job.model_config_(),
            gpus=2,
            gpu="cpu",
            global_batch=32,
            seq_len=128,
            precision=job_precision(job, "cpu"),
        )
    )
    first = runnable_candidates(result.candidates, 3)
    assert len({(c.layout.dp, c.layout.tp, c.layout.pp) for c in first}) == len(first) >= 2
    lay = first[1].layout
    sub = candidate_job(job, lay, 1, 4)
    assert sub.run.name == "tiny-measure-1" and sub.run_dir.parent == job.run_dir.parent
    assert (
        sub.parallel.data,
        sub.parallel.tensor,
        sub.parallel.pipeline,
        sub.parallel.zero_stage,
    ) == (lay.dp, lay.tp, lay.pp, lay.zero_stage)
    assert (
        sub.train.steps,
        sub.train.micro_batch,
        sub.train.log_every,
        sub.cluster.num_workers,
    ) == (4, lay.micro_batch, 1, lay.world_size)
    assert not sub.checkpoint.resume


def test_measure_needs_a_job_config():
    res = CliRunner().invoke(
        app, ["plan", "--model", "tiny", "--gpus", "2", "--gpu", "cpu", "--measure"]
    )
    assert "--measure needs --config" in str(res.exception)


@pytest.mark.slow
def test_measure_runs_two_layouts_and_picks_the_fastest(tiny):
    res = CliRunner().invoke(
        app,
        [
            "plan",
            "--config",
            str(tiny),
            "--gpus",
            "2",
            "--gpu",
            "cpu",
            "--measure",
            "--measure-top",
            "2",
            "--measure-steps",
            "3",
            "--json",
        ],
    )
    assert res.exit_code == 0, res.output
    measured = json.loads(res.stdout[res.stdout.index("{") :])["measured"]
    assert len(measured) == 2 and all((m["measured_step_s"] or 0) > 0 for m in measured), measured
    assert measured[0]["measured_step_s"] <= measured[1]["measured_step_s"]
    assert len({(m["layout"]["dp"], m["layout"]["tp"], m["layout"]["pp"]) for m in measured}) == 2
