"""``dashboards/``: the committed files equal a fresh ``mla dashboards build``, and the project
dashboard passes the structural lint (ids, grid, variables, datasource, units, exported
metrics); the lint itself catches each kind of mistake."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from orchestrator.contract.metrics import METRICS, exported_series_names
from orchestrator.dashboard_lint import lint_dashboard, metric_names, ray_metric_names
from orchestrator.dashboards import build_dashboard, build_files, stale_files

ROOT = Path(__file__).resolve().parents[1]
FOLDER = ROOT / "dashboards"


@pytest.fixture(scope="module")
def known_metrics() -> frozenset[str]:
    ray = [json.loads((FOLDER / "ray" / n).read_text()) for n in ("train.json", "default.json")]
    return exported_series_names() | ray_metric_names(ray)


def test_committed_dashboards_equal_a_fresh_build():
    stale = stale_files(ROOT, build_files())
    assert not stale, f"regenerate with `mla dashboards build`: {stale}"


def test_build_check_fails_on_a_stale_folder_and_passes_on_a_fresh_one(tmp_path, mla_cli):
    built = mla_cli("dashboards", "build", "--root", str(tmp_path))
    assert built.returncode == 0, built.stderr
    assert mla_cli("dashboards", "build", "--root", str(tmp_path), "--check").returncode == 0
    (tmp_path / "dashboards" / "mla-train.json").write_text("{}\n")
    stale = mla_cli("dashboards", "build", "--root", str(tmp_path), "--check")
    assert stale.returncode == 1 and "dashboards/mla-train.json" in stale.stderr


def test_project_dashboard_passes_the_lint(known_metrics):
    assert lint_dashboard(build_dashboard(), known_metrics) == []


def test_dashboard_has_the_rows_and_variables():
    dashboard = build_dashboard()
    rows = [p["title"] for p in dashboard["panels"] if p["type"] == "row"]
    assert rows == ["Progress", "Efficiency", "Memory", "Health", "Attention"]
    names = [v["name"] for v in dashboard["templating"]["list"]]
    assert names == ["datasource", "run", "rank"]


def test_every_worker_metric_is_shown_on_some_panel():
    exprs = " ".join(t["expr"] for p in build_dashboard()["panels"] for t in p.get("targets", []))
    used = metric_names(exprs)
    unused = [s.name for s in METRICS if not set(s.prometheus_names) & used]
    # the device peak enters only the MFU recording rule (dashboards/prometheus/rules.yml)
    assert set(unused) <= {"mla_train_device_peak_flops"}, unused


def _broken(mutate) -> dict:
    dashboard = copy.deepcopy(build_dashboard())
    mutate([p for p in dashboard["panels"] if p["type"] != "row"], dashboard)
    return dashboard


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda ps, d: ps[1].update(id=ps[0]["id"]), "is used twice"),
        (lambda ps, d: ps[0]["gridPos"].update(w=30), "outside 24 columns"),
        (lambda ps, d: ps[1].update(gridPos=dict(ps[0]["gridPos"])), "overlaps"),
        (lambda ps, d: ps[0].update(gridPos="oops"), "needs non-negative integers"),
        (lambda ps, d: ps[0]["targets"][0].update(refId=""), "refIds"),
        (
            lambda ps, d: ps[0]["targets"][0].update(expr='ray_mla_train_step{x=~"$nope"}'),
            "$nope is not",
        ),
        (
            lambda ps, d: ps[0]["targets"][0].update(expr="ray_mla_train_stepp"),
            "ray_mla_train_stepp is exported by neither",
        ),
        (lambda ps, d: ps[0].update(datasource="Prometheus"), "is not the ${datasource} variable"),
        (lambda ps, d: ps[0]["fieldConfig"]["defaults"].update(unit="furlongs"), "unit 'furlongs'"),
        (lambda ps, d: d["templating"]["list"].pop(0), "no `datasource` variable"),
    ],
)
def test_lint_catches(mutate, message, known_metrics):
    problems = lint_dashboard(_broken(mutate), known_metrics)
    assert any(message in p for p in problems), problems


def test_metric_names_skip_labels_functions_and_groupings():
    expr = (
        "histogram_quantile(0.5, sum by (le, ray_train_worker_world_rank) "
        '(rate(ray_mla_train_step_seconds_bucket{ray_train_run_name=~"$run"}[$__rate_interval]))) '
        "/ on (ray_train_run_name) ray_mla_train_world_size > 1e30"
    )
    assert metric_names(expr) == {"ray_mla_train_step_seconds_bucket", "ray_mla_train_world_size"}
