"""Kubernetes names, namespaces, label values, claim names and mount paths: refused at render
with the option named, and reported by ``mla k8s validate``."""

from __future__ import annotations

import copy

import pytest
from typer.testing import CliRunner

from orchestrator.cli import app
from orchestrator.config import load_job_config
from orchestrator.contract.errors import ConfigError
from orchestrator.k8s.render import RenderOptions, render_job, to_yaml
from orchestrator.k8s.validate import validation_errors


@pytest.mark.parametrize(
    "opts, words",
    [
        (RenderOptions(namespace="My_NS"), "--namespace: 'My_NS' is not a DNS-1123 label"),
        (RenderOptions(queue="team a!"), "--queue: 'team a!' is not a label value"),
        (
            RenderOptions(checkpoint_pvc="Bad_Claim"),
            "--pvc: 'Bad_Claim' is not a DNS-1123 subdomain",
        ),
        (
            RenderOptions(storage_path="relative/ckpt"),
            "--storage-path: 'relative/ckpt' is not an absolute path",
        ),
        (RenderOptions(node_selector={"gpu": "a" * 64}), "--node-selector"),
    ],
)
def test_render_refuses_names_kubernetes_would_reject(opts, words):
    with pytest.raises(ConfigError) as err:
        render_job(load_job_config("configs/tiny.yaml"), opts)
    assert words in str(err.value)


def _rendered() -> list[dict]:
    return render_job(load_job_config("configs/tiny.yaml"), RenderOptions())


def test_validate_reports_bad_namespace_label_claim_and_mount_path():
    config_map, rayjob = copy.deepcopy(_rendered())
    assert validation_errors(config_map) == [] and validation_errors(rayjob) == []
    rayjob["metadata"]["namespace"] = "Team_A"
    rayjob["metadata"]["labels"]["mla.run"] = "not valid!"
    cluster = rayjob["spec"]["rayClusterSpec"]
    pod = cluster["workerGroupSpecs"][0]["template"]["spec"]
    pod["volumes"] = [
        v
        if "persistentVolumeClaim" not in v
        else {**v, "persistentVolumeClaim": {"claimName": "Bad_Claim"}}
        for v in pod["volumes"]
    ]
    pod["containers"][0]["volumeMounts"][-1]["mountPath"] = "relative/path"
    text = "\n".join(validation_errors(rayjob))
    assert "metadata.namespace: 'Team_A' is not a DNS-1123 label" in text
    assert "'not valid!' is not a label value" in text
    assert "claimName: 'Bad_Claim' is not a DNS-1123 subdomain" in text
    assert "mountPath: 'relative/path' is not an absolute path" in text


def test_mla_k8s_validate_fails_on_them_and_on_a_non_mapping_document(tmp_path):
    _, rayjob = copy.deepcopy(_rendered())
    rayjob["metadata"]["namespace"] = "Team_A"
    bad = tmp_path / "bad.yaml"
    bad.write_text(to_yaml([rayjob]))
    result = CliRunner().invoke(app, ["k8s", "validate", str(bad)])
    assert result.exit_code == 1 and "DNS-1123 label" in result.output
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("just a string\n")
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "k8s", "validate", str(scalar)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (
        out.returncode == 2
        and "not a Kubernetes object" in out.stderr
        and "Traceback" not in out.stderr
    )


@pytest.mark.parametrize(
    "text", [b"apiVersion: v1\nclusters: [oops\n", b"\xff\xfe bad", b"clusters: 5\n"]
)
def test_malformed_kubeconfig_is_a_message(tmp_path, text):
    from orchestrator.contract.errors import ClusterError
    from orchestrator.k8s.client import connect

    path = tmp_path / "kubeconfig"
    path.write_bytes(text)
    with pytest.raises(ClusterError, match="malformed|cannot load"):
        connect(str(path))
