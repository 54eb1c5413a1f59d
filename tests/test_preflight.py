"""Preflight verdicts on real probe reports of this Python (no cluster needed): what passes, and
the one message that names what is missing, the nodes and the two fixes. The probe on a real
cluster is tested in tests/test_cluster_env.py."""

from __future__ import annotations

import dataclasses
import platform
from pathlib import Path

import pytest

from orchestrator.cluster_probe import probe_node
from orchestrator.config import load_job_config
from orchestrator.contract.errors import ClusterError
from orchestrator.preflight import check_result, expectations, project_requirements

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"


def _job(*sets: str):
    return load_job_config(CONFIG, list(sets))


def _result(expect, ips=("10.0.0.1",), gpus: float = 0, imports: bool = False) -> dict:
    """Probe this process once per pretend node (the same Python answering for each)."""
    probe = {**expect.probe_input(), **({} if imports else {"imports": []})}
    report = probe_node(probe)
    return {
        "nodes": [
            {
                "node_id": f"n{i}",
                "resources": {"CPU": 1.0, "GPU": gpus},
                "report": {**report, "ip": ip},
            }
            for i, ip in enumerate(ips)
        ],
        "errors": [],
    }


def test_this_environment_passes_its_own_preflight():
    expect = expectations(_job(), check_storage=False)
    assert {"torch", "deepspeed", "ray", "pydantic", "typer"} <= set(expect.requirements)
    assert "pytest" not in expect.requirements  # dev tools are not needed on the cluster
    check_result(expect, _result(expect, imports=True))  # really imports the training stack


def test_missing_packages_are_named_once_for_all_nodes_with_the_two_fixes():
    expect = expectations(_job(), check_storage=False)
    expect = dataclasses.replace(
        expect, requirements={**expect.requirements, "no-such-dist": ">=1"}
    )
    with pytest.raises(ClusterError) as err:
        check_result(expect, _result(expect, ips=("10.0.0.1", "10.0.0.2")))
    text = str(err.value)
    assert "- nodes 10.0.0.1, 10.0.0.2 (python " in text and ": missing no-such-dist" in text
    assert text.count("missing") == 1
    assert "docker build --target gpu" in text and "cluster.runtime_env.py_executable" in text


def test_version_mismatches_name_both_sides():
    expect = expectations(_job(), check_storage=False)
    expect = dataclasses.replace(
        expect,
        python="3.10",
        ray_version="2.59.0",
        requirements={**expect.requirements, "torch": "==2.12.0"},
    )
    with pytest.raises(ClusterError) as err:
        check_result(expect, _result(expect))
    text = str(err.value)
    assert f"Python {platform.python_version()} (the submitter runs 3.10)" in text
    assert (
        "(the project pins torch==2.12.0)" in text
        and "(the submitter runs ray 2.59.0; they must match)" in text
    )


def test_gpu_job_on_nodes_without_cuda_says_so():
    expect = expectations(_job("cluster.use_gpu=true"), check_storage=False)
    with pytest.raises(ClusterError, match=r"CUDA not visible to torch .* on a node with 1 GPU"):
        check_result(expect, _result(expect, gpus=1, imports=True))
    with pytest.raises(ClusterError, match="no node of the cluster advertises a GPU"):
        check_result(expect, _result(expect, gpus=0))


def test_a_path_that_exists_only_here_must_be_visible_on_the_cluster(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "corpus.txt").write_text("text")
    expect = expectations(
        _job("data.path=corpus.txt", "cluster.storage_path=/no/such/runs"), check_storage=True
    )
    result = _result(expect)
    for node in result["nodes"]:  # a node whose working directory lacks the file, as on a cluster
        node["report"]["paths"]["data.path"] = False
    with pytest.raises(ClusterError) as err:
        check_result(expect, result)
    text = str(err.value)
    assert "data.path 'corpus.txt' exists on this machine but not on node 10.0.0.1" in text
    assert "must be visible on the cluster" in text
    assert "cluster.storage_path '/no/such/runs' does not exist on node 10.0.0.1" in text
    assert "docker build" not in text  # the environment itself is fine: no image advice


def test_default_storage_is_not_required_to_exist():
    expect = expectations(_job(), check_storage=False)
    assert "cluster.storage_path" not in expect.paths


def test_requirements_come_from_pyproject():
    reqs = project_requirements()
    assert reqs["torch"] == "==2.13.0" and reqs["ray"] == "==2.60.0"
