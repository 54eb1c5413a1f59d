"""Kubernetes name rules that neither the OpenAPI schemas nor KubeRay's CRDs express, checked at
render time and by ``mla k8s validate`` (the API server would reject the object on create).

Rules from the Kubernetes API conventions (``k8s.io/apimachinery/pkg/util/validation``):
DNS-1123 label (namespaces, at most 63), DNS-1123 subdomain (object names such as ConfigMaps and
PersistentVolumeClaims, at most 253), label values (at most 63, alphanumerics with ``-_.`` inside,
or empty), qualified label keys (``prefix/name``), and absolute container mount paths.
"""

from __future__ import annotations

import re

_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


def dns1123_label_error(value: str) -> str | None:
    """Why ``value`` is not a DNS-1123 label (namespace), or ``None``."""
    if not isinstance(value, str) or len(value) > 63 or not _LABEL.match(value):
        return (
            f"{value!r} is not a DNS-1123 label (at most 63 lower-case letters, digits and '-', starting and "
            "ending with a letter or digit)"
        )
    return None


def dns1123_subdomain_error(value: str) -> str | None:
    """Why ``value`` is not a DNS-1123 subdomain (object or claim name), or ``None``."""
    if not isinstance(value, str) or len(value) > 253 or not _SUBDOMAIN.match(value):
        return (
            f"{value!r} is not a DNS-1123 subdomain (at most 253 lower-case letters, digits, '-' and '.', "
            "starting and ending with a letter or digit)"
        )
    return None


def label_value_error(value: str) -> str | None:
    """Why ``value`` is not a label value, or ``None``."""
    if not isinstance(value, str) or len(value) > 63 or not _LABEL_VALUE.match(value):
        return (
            f"{value!r} is not a label value (at most 63 letters, digits, '-', '_' and '.', starting and "
            "ending with a letter or digit)"
        )
    return None


def label_key_error(key: str) -> str | None:
    """Why ``key`` is not a qualified label key (``[prefix/]name``), or ``None``."""
    prefix, _, name = key.rpartition("/") if isinstance(key, str) else ("", "", "")
    if prefix and dns1123_subdomain_error(prefix):
        return f"label key {key!r}: prefix {prefix!r} is not a DNS-1123 subdomain"
    if not name or label_value_error(name):
        return f"label key {key!r}: name part must be 1-63 letters, digits, '-', '_' and '.'"
    return None


def mount_path_error(value: str) -> str | None:
    """Why ``value`` is not an absolute mount path, or ``None``."""
    if not isinstance(value, str) or not value.startswith("/") or ":" in value:
        return f"{value!r} is not an absolute path (it must start with '/' and contain no ':')"
    return None


def _labels_errors(where: str, labels) -> list[str]:
    errors = []
    for key, value in (labels or {}).items():
        errors += [f"{where}: {e}" for e in (label_key_error(key), label_value_error(value)) if e]
    return errors


def _pod_errors(where: str, pod: dict) -> list[str]:
    spec = pod.get("spec") or {}
    errors = _labels_errors(f"{where}.metadata.labels", (pod.get("metadata") or {}).get("labels"))
    errors += _labels_errors(f"{where}.spec.nodeSelector", spec.get("nodeSelector"))
    for i, volume in enumerate(spec.get("volumes") or []):
        claim = (volume.get("persistentVolumeClaim") or {}).get("claimName")
        if claim is not None and (e := dns1123_subdomain_error(claim)):
            errors.append(f"{where}.spec.volumes[{i}].persistentVolumeClaim.claimName: {e}")
    for kind in ("containers", "initContainers"):
        for c, container in enumerate(spec.get(kind) or []):
            for m, mount in enumerate(container.get("volumeMounts") or []):
                if e := mount_path_error(mount.get("mountPath")):
                    errors.append(f"{where}.spec.{kind}[{c}].volumeMounts[{m}].mountPath: {e}")
    return errors


def name_errors(obj: dict) -> list[str]:
    """Name, namespace, label, claim-name and mount-path problems of one manifest (``path: why``)."""
    meta = obj.get("metadata") or {}
    errors = []
    if "namespace" in meta and (e := dns1123_label_error(meta["namespace"])):
        errors.append(f"metadata.namespace: {e}")
    if "name" in meta and (e := dns1123_subdomain_error(meta["name"])):
        errors.append(f"metadata.name: {e}")
    errors += _labels_errors("metadata.labels", meta.get("labels"))
    cluster = (
        (obj.get("spec") or {}).get("rayClusterSpec")
        if obj.get("kind") == "RayJob"
        else obj.get("spec")
    )
    if isinstance(cluster, dict):
        head = (cluster.get("headGroupSpec") or {}).get("template")
        if isinstance(head, dict):
            errors += _pod_errors("headGroupSpec.template", head)
        for i, group in enumerate(cluster.get("workerGroupSpecs") or []):
            if isinstance(group.get("template"), dict):
                errors += _pod_errors(f"workerGroupSpecs[{i}].template", group["template"])
    elif obj.get("kind") == "Pod":
        errors += _pod_errors("<pod>", obj)
    return errors
