"""Offline strict validation: k8s/ manifests and typos, against KubeRay v1.7.0 CRDs and Kubernetes schemas."""

import copy
import os
import re
from pathlib import Path

import pytest
import yaml

from orchestrator.config import validate_job_dict
from orchestrator.k8s.validate import (
    CRD_FILES,
    extract_crd_schemas,
    load_manifests,
    strict_schema,
    validation_errors,
    vendored_schemas,
)
from orchestrator.layouts import runnable_layouts

ROOT = Path(__file__).resolve().parents[1]
MANIFESTS = sorted((ROOT / "k8s").glob("*.yaml"))
#: Upstream KubeRay v1.7.0 CRDs to compare the vendored schemas with: $MLA_KUBERAY_CRDS, or the
#: shared folder beside the checkout (../shared/k8s/crds).
SHARED_CRDS = Path(os.environ.get("MLA_KUBERAY_CRDS") or ROOT.parent / "shared" / "k8s" / "crds")
OPTIONAL = re.compile(r"^(\s*)#\+ ", re.M)


def _with_optional_fields(text: str) -> str:
    """Switch on every `#+ ` optional line (keep its indentation)."""
    return OPTIONAL.sub(r"\1", text)


def test_manifest_folder_has_the_promised_files():
    names = {p.name for p in MANIFESTS}
    assert {"raycluster.yaml", "rayjob-train.yaml", "rayjob-sweep.yaml", "rbac.yaml"} <= names


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_validates_as_written(path):
    objs = load_manifests(path)
    assert objs
    for obj in objs:
        assert validation_errors(obj) == []


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_validates_with_every_optional_field_on(path):
    text = path.read_text()
    switched = _with_optional_fields(text)
    for obj in yaml.safe_load_all(switched):
        if obj is not None:
            assert validation_errors(obj) == []


def test_optional_fields_are_present_and_documented():
    for path in (ROOT / "k8s" / "raycluster.yaml", ROOT / "k8s" / "rayjob-train.yaml"):
        lines = path.read_text().splitlines()
        starts = [
            i
            for i, line in enumerate(lines)
            if OPTIONAL.match(line) and not OPTIONAL.match(lines[i - 1])
        ]
        assert len(starts) >= 3, path
        for (
            i
        ) in starts:  # the comment right above each optional block says what it is and its default
            above = lines[i - 1].strip()
            assert above.startswith("#") and not above.startswith("#+"), (path.name, lines[i])
        assert sum("Default:" in line for line in lines) >= len(starts) - 2, path.name


def test_rbac_role_is_namespaced_and_least_privilege():
    role = next(o for o in load_manifests(ROOT / "k8s" / "rbac.yaml") if o["kind"] == "Role")
    rules = {
        (g, r): set(rule["verbs"])
        for rule in role["rules"]
        for g in rule["apiGroups"]
        for r in rule["resources"]
    }
    assert (
        rules[("ray.io", "rayjobs")]
        == rules[("ray.io", "rayclusters")]
        == {"create", "get", "list", "watch", "delete"}
    )
    assert rules[("", "pods")] == {"get", "list", "watch"}
    assert rules[("", "events")] == {"list"}
    assert not any(verbs & {"update", "patch", "*"} for verbs in rules.values())


def test_train_manifest_bounds_match_the_runnable_world_sizes_of_its_job():
    config_map, rayjob = load_manifests(ROOT / "k8s" / "rayjob-train.yaml")
    job = validate_job_dict(yaml.safe_load(config_map["data"]["job.yaml"]))
    group = rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    gpus = int(group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
    lo, hi = group["minReplicas"] * gpus, group["maxReplicas"] * gpus
    sizes = list(runnable_layouts(job, range(lo, hi + 1)))
    assert (sizes[0], sizes[-1]) == (lo, hi)
    assert rayjob["metadata"]["annotations"]["mla.io/world-sizes"] == ",".join(map(str, sizes))
    assert f"cluster.num_workers={hi}" in rayjob["spec"]["entrypoint"]
    assert f"cluster.min_workers={lo}" in rayjob["spec"]["entrypoint"]


# ----------------------------------------------------------------------------- typos are caught
def _train_rayjob():
    return copy.deepcopy(load_manifests(ROOT / "k8s" / "rayjob-train.yaml")[1])


@pytest.mark.parametrize(
    "where, typo",
    [
        ("spec", "shutdownAfterJobFinish"),
        ("spec.rayClusterSpec", "enableInTreeAutoScaling"),
        ("spec.rayClusterSpec.workerGroupSpecs.0", "minReplica"),
        ("spec.rayClusterSpec.workerGroupSpecs.0.template.spec", "toleration"),
        ("spec.rayClusterSpec.workerGroupSpecs.0.template.spec.containers.0", "resource"),
        ("metadata", "label"),
    ],
)
def test_a_typo_in_a_field_name_fails_validation(where, typo):
    obj = _train_rayjob()
    node = obj
    for part in where.split("."):
        node = node[int(part)] if part.isdigit() else node[part]
    node[typo] = {} if typo in ("label", "resource") else True
    errors = validation_errors(obj)
    assert len(errors) == 1 and f"'{typo}' was unexpected" in errors[0]
    path = where.replace(".", r"\.")
    assert re.search(rf"RayJob/mla-tiny: {path}: Additional properties", errors[0]), errors[0]


def test_wrong_types_and_enums_fail_validation():
    obj = _train_rayjob()
    obj["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["maxReplicas"] = "eight"
    obj["spec"]["rayClusterSpec"]["autoscalerOptions"]["upscalingMode"] = "Fast"
    obj["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0][
        "resources"
    ]["limits"]["nvidia.com/gpu"] = "one"
    text = "\n".join(validation_errors(obj))
    assert "'eight' is not of type 'integer'" in text
    assert "'Fast' is not one of ['Default', 'Aggressive', 'Conservative']" in text
    assert "'one'" in text


def test_kuberay_semantic_checks():
    obj = _train_rayjob()
    obj["metadata"]["name"] = "m" * 48
    obj["spec"]["shutdownAfterJobFinishes"] = False
    obj["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["minReplicas"] = 5
    text = "\n".join(validation_errors(obj))
    assert "has 48 characters; KubeRay allows 47" in text
    assert "ttlSecondsAfterFinished: needs spec.shutdownAfterJobFinishes: true" in text
    assert "minReplicas(5) <= replicas(2) <= maxReplicas(4)" in text
    obj = _train_rayjob()
    obj["metadata"]["name"] = "Mla_Tiny"
    assert "is not a DNS-1035 label" in "\n".join(validation_errors(obj))


def test_builtin_kind_typo_fails_validation():
    role = copy.deepcopy(
        next(o for o in load_manifests(ROOT / "k8s" / "rbac.yaml") if o["kind"] == "Role")
    )
    role["rules"][0]["resourceName"] = ["x"]  # the field is resourceNames
    errors = validation_errors(role)
    assert errors and all("'resourceName' was unexpected" in e for e in errors)
    assert {"(Kubernetes 1.29)", "(Kubernetes 1.37)"} <= {
        re.search(r"\(Kubernetes [\d.]+\)", e).group() for e in errors
    }


def test_unknown_kind_is_reported():
    assert (
        "Couldn't find schema"
        in validation_errors({"apiVersion": "v1", "kind": "Poddy", "metadata": {"name": "x"}})[0]
    )


# ----------------------------------------------------------------------------- the vendored schemas
def test_strict_schema_closes_objects_but_respects_preserve_unknown_fields():
    schema = strict_schema(
        {
            "type": "object",
            "properties": {
                "a": {"type": "object", "properties": {"b": {"type": "string", "nullable": True}}},
                "free": {
                    "type": "object",
                    "x-kubernetes-preserve-unknown-fields": True,
                    "properties": {},
                },
                "map": {"type": "object", "additionalProperties": {"type": "string"}},
            },
        }
    )
    assert (
        schema["additionalProperties"] is False
        and schema["properties"]["a"]["additionalProperties"] is False
    )
    assert schema["properties"]["a"]["properties"]["b"]["type"] == ["string", "null"]
    assert "additionalProperties" not in schema["properties"]["free"]
    assert schema["properties"]["map"]["additionalProperties"] == {"type": "string"}


def test_vendored_schemas_equal_the_shared_crds():
    if not SHARED_CRDS.is_dir():
        assert not os.environ.get("MLA_KUBERAY_CRDS"), (
            f"MLA_KUBERAY_CRDS={SHARED_CRDS} is not a folder"
        )
        pytest.skip(f"no KubeRay v1.7.0 CRDs at {SHARED_CRDS}; set MLA_KUBERAY_CRDS to compare")
    assert extract_crd_schemas(SHARED_CRDS) == vendored_schemas()
    assert set(vendored_schemas()["schemas"]) == set(CRD_FILES)


def test_an_empty_manifest_file_exits_2(tmp_path, mla_cli):
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    for command in (["k8s", "validate"], ["k8s", "render"]):
        res = mla_cli(*command, str(empty), timeout=120)
        assert res.returncode == 2 and "empty" in res.stderr, res.stderr
        assert "Traceback" not in res.stderr and res.stdout == ""
