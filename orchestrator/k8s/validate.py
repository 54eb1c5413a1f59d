"""Offline validation of Kubernetes manifests, as strict as the API server would be.

Three layers, each named after what it imitates:

1. **CRD kinds**: KubeRay's (``ray.io/v1`` RayCluster, RayJob) and prometheus-operator's
   (``monitoring.coreos.com/v1`` PodMonitor, PrometheusRule; v0.93.0, vendored in
   ``schemas/prometheus-operator-v0.93.0.json.gz``, regenerate with
   ``python -m orchestrator.k8s.validate --extract-monitoring-crds DIR``), as follows. KubeRay's
   (``ray.io/v1`` RayCluster, RayJob) against the ``openAPIV3Schema`` of the
   KubeRay v1.7.0 CustomResourceDefinitions (``ray-operator/config/crd/bases``). The schemas are
   vendored, descriptions stripped, in ``schemas/kuberay-v1.7.0.json.gz`` (regenerate with
   ``python -m orchestrator.k8s.validate --extract-crds DIR``). Unknown fields are rejected, as
   the API server does with ``fieldValidation=Strict``: every object schema that lists
   ``properties`` and neither ``additionalProperties`` nor ``x-kubernetes-preserve-unknown-fields``
   gets ``additionalProperties: false``. The root ``metadata`` is checked against the Kubernetes
   ``ObjectMeta`` schema.
2. **Built-in kinds** (ConfigMap, Role, RoleBinding, ServiceAccount, PersistentVolumeClaim...)
   against the strict Kubernetes JSON schemas shipped offline by ``kubernetes-validate``.
3. **KubeRay's own checks** that no schema expresses (names, replica bounds, TTL rules), after
   ``ValidateRayJobMetadata``/``ValidateRayJobSpec``/``ValidateRayClusterSpec`` in KubeRay v1.7.0
   ``ray-operator/controllers/ray/utils/validation.go``.

``kubernetes-validate`` is a development dependency; it is imported only when a check needs it.
"""

from __future__ import annotations

import copy
import functools
import gzip
import hashlib
import json
import re
import sys
from pathlib import Path
from typing import Any

import yaml

from orchestrator.contract.errors import MLAError

KUBERAY_VERSION = "v1.7.0"
"""KubeRay release whose CRDs are vendored."""
KUBERNETES_VERSIONS = ("1.29", "1.37")
"""Kubernetes versions the built-in kinds are checked against (oldest and newest supported)."""
SCHEMA_FILE = Path(__file__).with_name("schemas") / f"kuberay-{KUBERAY_VERSION}.json.gz"
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml"}
PROMETHEUS_OPERATOR_VERSION = "v0.93.0"
"""prometheus-operator release whose PodMonitor and PrometheusRule CRDs are vendored (from its
``example/prometheus-operator-crd/``, snapshot 6adcebc; Apache-2.0)."""
MONITORING_SCHEMA_FILE = (
    Path(__file__).with_name("schemas")
    / f"prometheus-operator-{PROMETHEUS_OPERATOR_VERSION}.json.gz"
)
MONITORING_CRD_FILES = {
    "PodMonitor": "monitoring.coreos.com_podmonitors.yaml",
    "PrometheusRule": "monitoring.coreos.com_prometheusrules.yaml",
}
MONITORING_API = "monitoring.coreos.com/v1"
_OBJECT_META_REF = "https://kubernetes.io/api/_definitions.json#/$defs/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"
DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
"""A DNS-1035 label (lower-case letters, digits and ``-``, starting with a letter): Kubernetes and KubeRay names."""
MAX_RAYJOB_NAME = 47
"""KubeRay ``MaxRayJobNameLength``: 53 - 6 (the RayCluster name adds a 6-character suffix)."""
MAX_RAYCLUSTER_NAME = 53
"""KubeRay ``MaxRayClusterNameLength``: 63 - len('-serve-svc')."""


class ManifestError(MLAError):
    """A manifest would be rejected by the API server or the KubeRay operator."""


# ----------------------------------------------------------------------------- vendored CRDs
def extract_crd_schemas(
    crd_dir: str | Path,
    files: dict[str, str] = CRD_FILES,
    release: tuple[str, str] = ("kuberay", KUBERAY_VERSION),
) -> dict:
    """Read the ``v1`` openAPIV3Schema of each KubeRay kind from CRD YAML files.

    Args:
        crd_dir: folder holding ``ray.io_rayclusters.yaml`` and ``ray.io_rayjobs.yaml`` (or the
            ``files`` given).
        files: Kind -> CRD file name (default: KubeRay's; :data:`MONITORING_CRD_FILES` for
            prometheus-operator's).
        release: ``(project, version)`` recorded in the output.

    Returns:
        ``{project: version, "sources": {file: sha256}, "schemas": {kind: schema}}`` with every
        ``description`` removed (they are 80% of the bytes and never affect validation).

    Raises:
        ManifestError: a file is missing or holds no ``v1`` version.
    """
    out: dict[str, Any] = {release[0]: release[1], "sources": {}, "schemas": {}}
    for kind, name in files.items():
        path = Path(crd_dir) / name
        if not path.is_file():
            raise ManifestError(f"CRD file {str(path)!r} not found; pass the folder holding {name}")
        raw = path.read_bytes()
        out["sources"][name] = hashlib.sha256(raw).hexdigest()
        crd = yaml.load(
            raw, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)
        )  # C parser: 10x faster
        versions = {v["name"]: v for v in crd["spec"]["versions"]}
        if "v1" not in versions:
            raise ManifestError(f"{path}: no v1 version (found {', '.join(versions)})")
        out["schemas"][kind] = _strip_descriptions(versions["v1"]["schema"]["openAPIV3Schema"])
    return out


def write_schema_file(data: dict, path: Path = SCHEMA_FILE) -> None:
    """Write the extracted schemas as deterministic gzip'd JSON (same input, same bytes)."""
    text = json.dumps(data, sort_keys=True, separators=(",", ":")).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(text, mtime=0))


@functools.lru_cache(maxsize=2)
def vendored_schemas(path: Path = SCHEMA_FILE) -> dict:
    """The vendored KubeRay CRD schemas (see :func:`extract_crd_schemas`), or those of
    ``path`` (:data:`MONITORING_SCHEMA_FILE`: prometheus-operator's)."""
    return json.loads(gzip.decompress(path.read_bytes()))


def _strip_descriptions(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _strip_descriptions(v) for k, v in node.items() if k != "description"}
    if isinstance(node, list):
        return [_strip_descriptions(v) for v in node]
    return node


def strict_schema(node: Any) -> Any:
    """Turn a structural openAPIV3Schema into a JSON Schema that rejects unknown fields.

    ``nullable: true`` becomes a ``null`` alternative; ``additionalProperties: false`` is added to
    every object that lists ``properties`` and neither ``additionalProperties`` nor
    ``x-kubernetes-preserve-unknown-fields``. Other ``x-kubernetes-*`` keys are kept (JSON Schema
    ignores unknown keywords); ``int-or-string`` is already an ``anyOf`` in controller-gen output.
    """
    if isinstance(node, list):
        return [strict_schema(v) for v in node]
    if not isinstance(node, dict):
        return node
    out = {k: strict_schema(v) for k, v in node.items()}
    if out.get("nullable") and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    if (
        out.get("type") == "object"
        and "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


@functools.lru_cache(maxsize=4)
def _crd_validator(kind: str):
    import jsonschema

    source = MONITORING_SCHEMA_FILE if kind in MONITORING_CRD_FILES else SCHEMA_FILE
    schema = strict_schema(copy.deepcopy(vendored_schemas(source)["schemas"][kind]))
    schema["properties"]["metadata"] = {"$ref": _OBJECT_META_REF}
    schema["required"] = sorted({*schema.get("required", ()), "apiVersion", "kind", "metadata"})
    return jsonschema.Draft202012Validator(schema, registry=_k8s_registry(KUBERNETES_VERSIONS[-1]))


@functools.lru_cache(maxsize=4)
def _k8s_registry(version: str):
    """Registry holding the strict Kubernetes definitions of ``kubernetes-validate``."""
    from referencing import Registry

    return _k8s_definitions(f"v{version}.0-local-strict", version) @ Registry()


@functools.lru_cache(maxsize=4)
def _k8s_definitions(schema_dir: str, version: str):
    """``kubernetes-validate``'s ``_definitions.json`` of one schema folder, parsed once (1.2 MB
    for 1.29, 1.8 MB for 1.37)."""
    from referencing import Resource

    kv_utils = _kubernetes_validate()
    return Resource.from_contents(
        kv_utils.schema_contents(f"kubernetes-json-schema/{schema_dir}/_definitions.json", version)
    )


@functools.lru_cache(maxsize=64)
def _builtin_validator(version: str, kind: str, api_version: str):
    """The strict validator of one built-in kind, built once per (version, kind, apiVersion).

    The same schema, registry and validator as ``kubernetes_validate.utils.validate(obj,
    version, strict=True)``, which re-reads and parses the whole ``_definitions.json`` on every
    call (~40 ms and ~10^5 objects for the garbage collector per object and version).

    Raises:
        kubernetes_validate.utils.SchemaNotFoundError: no schema for ``kind``/``api_version``.
    """
    import jsonschema
    from referencing import Registry, Resource

    utils = _kubernetes_validate()
    # The schema folder utils.validate picks: the newest shipped version not newer than asked.
    newest = [v for v in utils.all_versions() if utils.major_minor(v) <= utils.major_minor(version)]
    schema_dir = f"v{newest[-1]}-local-strict"
    group = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", api_version)
    try:
        schema = utils.schema_contents(
            f"kubernetes-json-schema/{schema_dir}/{kind.lower()}-{group}.json", version
        )
    except FileNotFoundError:
        raise utils.SchemaNotFoundError(
            version=utils.major_minor(version), kind=kind, api_version=api_version
        ) from None
    registry = _k8s_definitions(schema_dir, version) @ (Resource.from_contents(schema) @ Registry())
    return jsonschema.Draft202012Validator(schema, registry=registry)


def _kubernetes_validate():
    try:
        from kubernetes_validate import utils
    except ImportError:  # pragma: no cover - dev dependency
        raise ManifestError(
            "validating Kubernetes manifests needs the 'kubernetes-validate' package; "
            "install the dev extras: pip install -e '.[dev]'"
        ) from None
    return utils


# ----------------------------------------------------------------------------- validation
def validation_errors(obj: dict) -> list[str]:
    """Every reason the API server (strict field validation) or KubeRay would reject ``obj``.

    Args:
        obj: one manifest as a plain dict (``apiVersion``, ``kind``, ``metadata``...).

    Returns:
        ``"Kind/name: path: message"`` lines; empty when the object is accepted.
    """
    if not isinstance(obj, dict) or "kind" not in obj or "apiVersion" not in obj:
        return [f"<document>: not a Kubernetes object (needs apiVersion and kind): {str(obj)[:80]}"]
    label = f"{obj['kind']}/{(obj.get('metadata') or {}).get('name', '?')}"
    if obj["apiVersion"] == "ray.io/v1" and obj["kind"] in CRD_FILES:
        errors = [_format(e) for e in _crd_validator(obj["kind"]).iter_errors(obj)]
        if not errors:
            errors = kuberay_errors(obj)
    elif obj["apiVersion"] == MONITORING_API and obj["kind"] in MONITORING_CRD_FILES:
        errors = [_format(e) for e in _crd_validator(obj["kind"]).iter_errors(obj)]
    elif obj["apiVersion"].startswith("ray.io/"):
        errors = [
            f"apiVersion {obj['apiVersion']!r} kind {obj['kind']!r}: only ray.io/v1 RayCluster "
            "and RayJob are supported"
        ]
    else:
        errors = _builtin_errors(obj)
    from orchestrator.k8s.names import name_errors

    errors += [e for e in name_errors(obj) if e not in errors]
    return [f"{label}: {e}" for e in errors]


def _builtin_errors(obj: dict) -> list[str]:
    utils = _kubernetes_validate()
    errors = []
    import jsonschema

    for version in KUBERNETES_VERSIONS:
        try:
            _builtin_validator(version, obj["kind"], obj["apiVersion"]).validate(obj)
        except utils.SchemaNotFoundError as exc:
            errors.append(exc.message)
        except jsonschema.ValidationError as exc:
            errors.append(f"(Kubernetes {version}) {_format(exc)}")
    return sorted(set(errors))


def _format(err) -> str:
    path = ".".join(str(p) for p in err.absolute_path) or "<root>"
    return f"{path}: {err.message}"


def kuberay_errors(obj: dict) -> list[str]:
    """KubeRay v1.7.0's own checks (``validation.go``) that no schema can express.

    Covers: names (DNS-1035 label, at most 47 characters for a RayJob and 53 for a RayCluster),
    at least one container per group, ``minReplicas <= replicas <= maxReplicas``, TTL only with
    ``shutdownAfterJobFinishes``, non-negative ``backoffLimit``, positive
    ``activeDeadlineSeconds`` and a ``runtimeEnvYAML`` that parses as YAML.
    """
    errors = []
    name = obj.get("metadata", {}).get("name", "")
    limit = MAX_RAYJOB_NAME if obj["kind"] == "RayJob" else MAX_RAYCLUSTER_NAME
    if len(name) > limit:
        errors.append(
            f"metadata.name: {obj['kind']} name {name!r} has {len(name)} characters; KubeRay allows {limit}"
        )
    if not DNS1035.match(name):
        errors.append(
            f"metadata.name: {name!r} is not a DNS-1035 label (lower-case letters, digits, '-', "
            "starting with a letter)"
        )
    spec = obj.get("spec", {})
    if obj["kind"] == "RayJob":
        errors += _rayjob_spec_errors(spec)
        spec = spec.get("rayClusterSpec") or {}
        prefix = "spec.rayClusterSpec"
    else:
        prefix = "spec"
    return errors + [f"{prefix}.{e}" for e in _raycluster_spec_errors(spec)]


def _rayjob_spec_errors(spec: dict) -> list[str]:
    errors = []
    if not spec.get("shutdownAfterJobFinishes") and spec.get("ttlSecondsAfterFinished", 0) > 0:
        errors.append("spec.ttlSecondsAfterFinished: needs spec.shutdownAfterJobFinishes: true")
    if spec.get("backoffLimit", 0) < 0:
        errors.append(f"spec.backoffLimit: {spec['backoffLimit']} must be >= 0")
    if "activeDeadlineSeconds" in spec and spec["activeDeadlineSeconds"] <= 0:
        errors.append(f"spec.activeDeadlineSeconds: {spec['activeDeadlineSeconds']} must be > 0")
    if not spec.get("rayClusterSpec") and not spec.get("clusterSelector"):
        errors.append("spec: one of rayClusterSpec or clusterSelector must be set")
    if "runtimeEnvYAML" in spec:
        try:
            yaml.safe_load(spec["runtimeEnvYAML"])
        except yaml.YAMLError as exc:
            errors.append(f"spec.runtimeEnvYAML: not valid YAML: {exc}")
    return errors


def _raycluster_spec_errors(spec: dict) -> list[str]:
    errors = []
    if spec and not spec.get("headGroupSpec", {}).get("template", {}).get("spec", {}).get(
        "containers"
    ):
        errors.append("headGroupSpec: needs at least one container")
    for i, group in enumerate(spec.get("workerGroupSpecs", [])):
        where = f"workerGroupSpecs[{i}]"
        if not group.get("template", {}).get("spec", {}).get("containers"):
            errors.append(f"{where}: needs at least one container")
        lo, hi = group.get("minReplicas", 0), group.get("maxReplicas", 2**31 - 1)
        replicas = group.get("replicas", lo)
        if not lo <= replicas <= hi:
            errors.append(
                f"{where}: needs minReplicas({lo}) <= replicas({replicas}) <= maxReplicas({hi})"
            )
    return errors


def load_manifests(path: str | Path) -> list[dict]:
    """All non-empty YAML documents of a file (``---`` separated).

    Raises:
        ManifestError: the file is missing, empty or is not valid YAML.
    """
    p = Path(path)
    if not p.is_file():
        raise ManifestError(f"manifest file {str(p)!r} does not exist")
    try:
        docs = [d for d in yaml.safe_load_all(p.read_bytes().decode("utf-8")) if d is not None]
    except UnicodeDecodeError as exc:
        raise ManifestError(
            f"{p}: not a UTF-8 text file (byte {exc.start}: {exc.reason})"
        ) from None
    except yaml.YAMLError as exc:
        raise ManifestError(f"{p}: not valid YAML: {exc}") from None
    if not docs:
        raise ManifestError(
            f"{p}: no manifest in the file (it is empty); validate the output of "
            "`mla k8s render JOB.yaml > FILE`"
        )
    bad = [i for i, d in enumerate(docs) if not isinstance(d, dict)]
    if bad:
        raise ManifestError(
            f"{p}: document {bad[0] + 1} is a {type(docs[bad[0]]).__name__}, not a Kubernetes "
            "object (a mapping with apiVersion, kind and metadata)"
        )
    return docs


def main(argv: list[str] | None = None) -> int:
    """``python -m orchestrator.k8s.validate FILES...`` or ``--extract-crds DIR``."""
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["--extract-crds"] and len(args) == 2:
        write_schema_file(extract_crd_schemas(args[1]))
        print(f"wrote {SCHEMA_FILE}")
        return 0
    if args[:1] == ["--extract-monitoring-crds"] and len(args) == 2:
        release = ("prometheus-operator", PROMETHEUS_OPERATOR_VERSION)
        data = extract_crd_schemas(args[1], MONITORING_CRD_FILES, release)
        write_schema_file(data, MONITORING_SCHEMA_FILE)
        print(f"wrote {MONITORING_SCHEMA_FILE}")
        return 0
    bad = 0
    for path in args:
        for obj in load_manifests(path):
            errors = validation_errors(obj)
            bad += bool(errors)
            print(
                "\n".join(f"{path}: {e}" for e in errors)
                or f"{path}: {obj['kind']}/{obj['metadata']['name']} ok"
            )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
