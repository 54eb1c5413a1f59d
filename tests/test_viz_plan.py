"""``mla viz plan``: one stacked bar per candidate of a real ``mla plan --json``, whose segments
are the planner's memory components, with the GPU limit drawn."""

from __future__ import annotations

import json

import numpy as np
import pytest

from orchestrator.viz_plan import PARTS, plan_figure


@pytest.fixture(scope="module")
def plan_json(tmp_path_factory, mla_cli):
    got = mla_cli("plan", "--model", "7b", "--gpus", "16", "--gpu", "h100", "--json", "--top", "4")
    assert got.returncode == 0, got.stderr
    path = tmp_path_factory.mktemp("plan") / "plan.json"
    path.write_text(got.stdout)
    return path


def test_bars_are_the_planners_memory_components(plan_json):
    plan = json.loads(plan_json.read_text())
    ax = plan_figure(plan).axes[0]
    bars = [c.patches for c in ax.containers]
    assert len(bars) == len(PARTS)
    for part, patches in zip(PARTS, bars, strict=True):
        heights = [p.get_height() for p in patches]
        assert heights == pytest.approx(
            [c["estimate"]["memory_gib"][part] for c in plan["candidates"]]
        )
    tops = [
        sum(bars[i][j].get_height() for i in range(len(PARTS)))
        for j in range(len(plan["candidates"]))
    ]
    assert tops == pytest.approx(
        [c["estimate"]["memory_gib"]["total"] for c in plan["candidates"]], abs=0.02
    )
    limit = [line for line in ax.get_lines() if line.get_linestyle() == "--"]
    assert (
        limit and limit[0].get_ydata()[0] == plan["candidates"][0]["estimate"]["memory_limit_gib"]
    )


def test_cli_writes_a_png_and_refuses_other_json(plan_json, tmp_path, mla_cli):
    from matplotlib.image import imread

    got = mla_cli("viz", "plan", str(plan_json), "-o", str(tmp_path / "p.png"))
    assert got.returncode == 0, got.stderr
    assert np.std(imread(tmp_path / "p.png")[..., :3]) > 0.05
    (tmp_path / "bad.json").write_text("{}")
    bad = mla_cli("viz", "plan", str(tmp_path / "bad.json"))
    assert bad.returncode == 2 and "no candidates" in bad.stderr
