"""Elastic re-plan under Ray: a `parallel: auto` run started on 4 workers, restarted on 2, then on
4 again (same run name), continues each time from its last checkpoint at the same step, under
the layout the planner chooses for the new world size, with the same global batch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from orchestrator.layouts import layout_for_world

pytestmark = pytest.mark.slow
ELASTIC = ["train.warmup_steps=3", "train.eval_batches=1", "parallel=auto", "run.name=elastic"]


def _starts(run_dir: Path) -> list[dict]:
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    return [e for e in events if e["event"] == "start"]


def test_restart_with_fewer_then_more_workers_replans_and_continues(
    tmp_path, mla_cli, fast_overrides, tiny_job
):
    def _train(workers: int, steps: int):
        sets = [
            f"run.dir={tmp_path}",
            *fast_overrides,
            *ELASTIC,
            f"cluster.num_workers={workers}",
            f"train.steps={steps}",
        ]
        return mla_cli("train", "configs/tiny.yaml", sets=sets, timeout=500)

    def _planned(workers: int):
        return layout_for_world(
            tiny_job(*fast_overrides, *ELASTIC, f"cluster.num_workers={workers}"), workers
        )

    run_dir = tmp_path / "elastic"
    for workers, steps in ((4, 10), (2, 20), (4, 30)):
        done = _train(workers, steps)
        assert done.returncode == 0, done.stderr[-3000:]
        assert (
            _planned(workers).describe() in done.stderr
        )  # the planner's layout shows in the progress output
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["steps"] == steps and summary["world_size"] == workers
    starts = _starts(run_dir)
    assert [(s["world_size"], s["resumed_from_step"]) for s in starts] == [
        (4, None),
        (2, 10),
        (4, 20),
    ]
    layouts = [s["layout"] for s in starts]
    assert layouts == [_planned(4).to_dict(), _planned(2).to_dict(), _planned(4).to_dict()]
    assert layouts[0] != layouts[1]  # re-planned for the new world size
    assert {lay["dp"] * lay["micro_batch"] * lay["grad_accum"] for lay in layouts} == {
        16
    }  # global batch kept
    assert (
        starts[1]["checkpoint_layout"] == layouts[0]
        and starts[2]["checkpoint_layout"] == layouts[1]
    )
    assert summary["resumes"] == [{"step": 10, "world_size": 2}, {"step": 20, "world_size": 4}]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records]
    assert steps == sorted(set(steps)) and steps[-1] == 30
    loss = {r["step"]: r["loss"] for r in records if "loss" in r}
    assert loss[30] < loss[15] < loss[5]  # the curve continues downwards across both resizes
