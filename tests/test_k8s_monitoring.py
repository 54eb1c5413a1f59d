"""``k8s/monitoring/``: the PodMonitors, PrometheusRule and dashboard ConfigMaps pass the strict
offline validation against the vendored prometheus-operator v0.93.0 CRDs (and Kubernetes'
ConfigMap schema), and that validation rejects the mistakes it should."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from orchestrator.dashboards import build_rules
from orchestrator.k8s.validate import load_manifests, validation_errors

ROOT = Path(__file__).resolve().parents[1]
FOLDER = ROOT / "k8s" / "monitoring"


def _docs(name: str) -> list[dict]:
    return load_manifests(FOLDER / name)


@pytest.mark.parametrize("name", ["podmonitors.yaml", "prometheusrule.yaml", "dashboards.yaml"])
def test_shipped_manifests_validate(name):
    docs = _docs(name)
    assert docs
    assert [e for d in docs for e in validation_errors(d)] == []


def test_the_rule_holds_the_dashboards_rules_and_every_dashboard_has_a_config_map():
    (rule,) = _docs("prometheusrule.yaml")
    assert rule["spec"] == build_rules()
    assert rule["spec"] == yaml.safe_load((ROOT / "dashboards/prometheus/rules.yml").read_text())
    maps = _docs("dashboards.yaml")
    assert sorted(k for m in maps for k in m["data"]) == [
        "mla-train.json",
        "ray-default.json",
        "ray-train.json",
    ]
    for config_map in maps:  # the API server's 1 MiB object limit
        assert len(yaml.safe_dump(config_map).encode()) < 1024 * 1024
        assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"


def test_a_misspelt_pod_monitor_field_is_rejected():
    monitor = copy.deepcopy(_docs("podmonitors.yaml")[0])
    monitor["spec"]["podMetricsEndpoints"][0]["prot"] = monitor["spec"]["podMetricsEndpoints"][
        0
    ].pop("port")
    errors = validation_errors(monitor)
    assert any("'prot' was unexpected" in e for e in errors), errors


def test_a_bad_rule_is_rejected():
    rule = copy.deepcopy(_docs("prometheusrule.yaml")[0])
    rule["spec"]["groups"][1]["rules"][0]["for"] = "five minutes"  # not a Prometheus duration
    errors = validation_errors(rule)
    assert any("spec.groups.1.rules.0.for" in e for e in errors), errors
