"""promtool (from Debian's prometheus package) on the generated PromQL: every panel expression
and every rule parses (``promtool check rules``), and the derived maths (tokens/s, straggler
ratio, MFU, ETA) and each alert give the hand-worked values on synthetic series
(``promtool test rules tests/promtool/rules_test.yml``)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml

from orchestrator.dashboards import ALERTS, build_dashboard, iter_panels
from tests.harness.prometheus import prometheus_bin_dir

ROOT = Path(__file__).resolve().parents[1]
VARIABLES = {"run": ".*", "rank": ".*", "__rate_interval": "1m"}


@pytest.fixture(scope="module")
def promtool() -> Path:
    try:
        return prometheus_bin_dir() / "promtool"
    except RuntimeError as exc:
        pytest.skip(f"Debian's prometheus package cannot be had here: {exc}")


def substitute(expr: str) -> str:
    """A panel expression with the dashboard variables replaced by match-all values."""
    return re.sub(r"\$\{?(\w+)\}?", lambda m: VARIABLES[m.group(1)], expr)


def _promtool(promtool: Path, *args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(promtool), *args], capture_output=True, text=True, cwd=cwd, timeout=60
    )


def test_every_panel_expression_parses(promtool, tmp_path):
    rules = [
        {"record": f"panel:p{panel['id']}_{target['refId']}", "expr": substitute(target["expr"])}
        for panel in iter_panels(build_dashboard())
        for target in panel["targets"]
    ]
    path = tmp_path / "panels.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "panels", "rules": rules}]}))
    got = _promtool(promtool, "check", "rules", str(path))
    assert got.returncode == 0, got.stdout + got.stderr
    assert f"SUCCESS: {len(rules)} rules found" in got.stdout


def test_rules_file_parses(promtool):
    got = _promtool(promtool, "check", "rules", "dashboards/prometheus/rules.yml")
    assert got.returncode == 0, got.stdout + got.stderr


def test_a_broken_expression_is_rejected(promtool, tmp_path):
    path = tmp_path / "bad.yml"
    path.write_text(
        yaml.safe_dump(
            {"groups": [{"name": "g", "rules": [{"record": "r", "expr": "sum by (le (x)"}]}]}
        )
    )
    assert _promtool(promtool, "check", "rules", str(path)).returncode != 0


def test_derived_maths_and_alerts_on_synthetic_series(promtool):
    tests = yaml.safe_load((ROOT / "tests/promtool/rules_test.yml").read_text())["tests"]
    tested = {t["alertname"] for case in tests for t in case.get("alert_rule_test", [])}
    assert tested == {a["alert"] for a in ALERTS}  # every alert has a unit test
    got = _promtool(promtool, "test", "rules", "rules_test.yml", cwd=ROOT / "tests/promtool")
    assert got.returncode == 0, got.stdout + got.stderr
