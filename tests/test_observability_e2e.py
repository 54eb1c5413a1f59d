"""End to end: a real Prometheus (Debian's package) scrapes a real two-worker ``mla train`` on
loopback at 1 s; afterwards every query of every panel of ``dashboards/mla-train.json``
returns a finite value over the run's window (GPU-only panels are listed as skipped), and the
step metric's maximum equals the last step of ``metrics.jsonl``; Ray's own Train dashboard fills
its Train Metrics row from the same run."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from orchestrator.dashboard_lint import metric_names
from orchestrator.dashboards import iter_panels
from orchestrator.launcher import free_port
from tests.harness.cli import FAST_OVERRIDES, TINY_CONFIG, MlaCli
from tests.harness.prometheus import prometheus_bin_dir, start_prometheus

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
STEPS = 40


def _finite(results: list[dict]) -> bool:
    return any(math.isfinite(float(v)) for r in results for _, v in r["values"])


def _expr(expr: str, run: str) -> str:
    values = {
        "run": run,
        "rank": ".*",
        "__rate_interval": "5s",
        "TrainRunName": run,
        "window": "5s",
    }
    return re.sub(r"\$\{?(\w+)\}?", lambda m: values.get(m.group(1), ".*"), expr)


RAY_TRAIN_PANELS = (
    "Controller State",
    "Cumulative Worker Group Start/Shutdown Time",
    "Cumulative Time in ray.train.report",
)
"""Panels of the Train Metrics row of Ray's own Train dashboard that a run without Ray Train
checkpoints fills (the checkpoint sync/transfer panels stay empty: no Checkpoint is reported)."""


def test_every_panel_has_data_from_a_scraped_training_run(tmp_path):
    try:
        bin_dir = prometheus_bin_dir()
    except RuntimeError as exc:
        pytest.skip(f"Debian's prometheus package cannot be had here: {exc}")
    metrics_port, prom_port = free_port(), free_port()
    server = start_prometheus(bin_dir, tmp_path / "prom", [f"127.0.0.1:{metrics_port}"], prom_port)
    try:
        env = {
            **os.environ,
            "RAY_metrics_report_interval_ms": "1000",  # Ray exports every 1 s (default 10 s)
            "DASHBOARD_METRIC_PORT": str(free_port()),  # other local Rays hold the defaults
            "AUTOSCALER_METRIC_PORT": str(free_port()),
        }
        sets = [
            f"run.dir={tmp_path}",
            *FAST_OVERRIDES,
            f"train.steps={STEPS}",
            "train.log_every=2",
            f"cluster.metrics_port={metrics_port}",
            "run.name=observed",
        ]
        start = time.time()
        run = subprocess.run(
            MlaCli().command("train", TINY_CONFIG, sets=sets),
            capture_output=True,
            text=True,
            timeout=400,
            env=env,
        )
        end = time.time() + 3
        assert run.returncode == 0, run.stderr[-3000:]
        assert f"metrics: http://127.0.0.1:{metrics_port}/metrics" in run.stderr
        time.sleep(3)  # the last scrape lands

        records = [
            json.loads(x)
            for x in (tmp_path / "observed" / "metrics.jsonl").read_text().splitlines()
        ]
        peak = server.query(
            f'max_over_time(max(ray_mla_train_step{{ray_train_run_name="observed"}})[{int(end - start) + 5}s:1s])',
            end,
        )
        assert peak and float(peak[0]["value"][1]) == records[-1]["step"] == STEPS

        dashboard = json.loads((ROOT / "dashboards" / "mla-train.json").read_text())
        empty, skipped, checked = [], [], 0
        for panel in iter_panels(dashboard):
            if "gpu" in panel.get("tags", []):
                skipped.append(panel["title"])
                continue
            for target in panel["targets"]:
                checked += 1
                expr = _expr(target["expr"], "observed")
                if not _finite(server.query_range(expr, start, end, step=1)):
                    present = {
                        m: len(
                            server.query_range(f'{m}{{ray_train_run_name="observed"}}', start, end)
                        )
                        for m in sorted(metric_names(expr))
                    }
                    empty.append(
                        f"{panel['title']} [{target['refId']}]: {expr} (series: {present})"
                    )
        print(f"{checked} panel queries with data; GPU-only panels skipped on CPU: {skipped}")
        assert not empty, "\n".join(empty)

        ray_train = json.loads((ROOT / "dashboards" / "ray" / "train.json").read_text())
        for panel in iter_panels(ray_train):
            if panel["title"] in RAY_TRAIN_PANELS:
                exprs = [_expr(t["expr"], "observed") for t in panel["targets"]]
                assert any(_finite(server.query_range(e, start, end)) for e in exprs), panel[
                    "title"
                ]
    finally:
        server.stop()
