"""Create, observe and delete RayJobs with the official ``kubernetes`` Python client.

Least privilege: this module needs exactly the verbs of ``k8s/rbac.yaml`` (RayJob create, get,
delete; pods list; events list; ConfigMap create, delete). It never updates a RayJob or its
RayCluster: with in-tree autoscaling the Ray autoscaler owns the worker group's ``replicas``.

``kubernetes`` is imported inside the functions (it takes about a second to import), so
``mla --help`` stays fast.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from orchestrator.contract.errors import ClusterError
from orchestrator.k8s.render import config_map_name
from orchestrator.k8s.status import Snapshot, changes, snapshot

GROUP, VERSION, PLURAL = "ray.io", "v1", "rayjobs"


def connect(kubeconfig: str | None = None, context: str | None = None) -> Any:
    """An ``ApiClient`` from a kubeconfig file, or the in-cluster service account.

    Without ``kubeconfig``, a process inside a pod (``KUBERNETES_SERVICE_HOST`` set) uses its
    service account; elsewhere ``$KUBECONFIG`` or ``~/.kube/config`` is read.

    Raises:
        ClusterError: no usable configuration was found.
    """
    from kubernetes import client, config

    if kubeconfig is not None and not Path(kubeconfig).expanduser().is_file():
        raise ClusterError(
            f"--kubeconfig {kubeconfig} does not exist or is not a file; pass the path of a "
            "kubeconfig (e.g. ~/.kube/config), or leave it out to use $KUBECONFIG"
        )
    try:
        if kubeconfig is None and context is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
            config.load_incluster_config()
            return client.ApiClient()
        cfg = client.Configuration()
        config.load_kube_config(config_file=kubeconfig, context=context, client_configuration=cfg)
        return client.ApiClient(cfg)
    except (config.ConfigException, OSError) as exc:
        raise ClusterError(
            f"cannot load Kubernetes credentials ({exc}); pass --kubeconfig FILE "
            "[--context NAME], set $KUBECONFIG, or run inside a pod with a service account"
        ) from None
    except (ValueError, TypeError, AttributeError, KeyError, yaml.YAMLError) as exc:
        # the kubernetes client lets a malformed file escape as YAML/Unicode/Type errors
        where = kubeconfig or os.environ.get("KUBECONFIG") or "~/.kube/config"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ClusterError(
            f"kubeconfig {where} is malformed ({type(exc).__name__}: {first}); it must be a "
            "UTF-8 YAML kubeconfig with clusters, users and contexts lists (see `kubectl config "
            "view`)"
        ) from None


def submit(api: Any, objs: list[dict]) -> dict:
    """Create the RayJob, then its job ConfigMap owned by it (deleted with it).

    The RayJob goes first so the ConfigMap can name it as owner; the head pod waits for the
    ConfigMap volume (kubelet retries the mount), which exists milliseconds later.

    Args:
        api: ``kubernetes.client.ApiClient``.
        objs: ``[ConfigMap, RayJob]`` from :func:`orchestrator.k8s.render.render_job`.

    Returns:
        The RayJob as stored by the API server.

    Raises:
        ClusterError: the API server refused (exists already, forbidden, invalid); a RayJob
            created before the ConfigMap failed is deleted again.
    """
    from kubernetes import client

    config_map = next(o for o in objs if o["kind"] == "ConfigMap")
    rayjob = next(o for o in objs if o["kind"] == "RayJob")
    ns, name = rayjob["metadata"]["namespace"], rayjob["metadata"]["name"]
    custom, core = _apis(client, api)
    with _api_errors(f"create RayJob {ns}/{name}"):
        created = custom.create_namespaced_custom_object(
            GROUP, VERSION, ns, PLURAL, rayjob, field_validation="Strict"
        )
        created = created or custom.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name)
    uid = created.get("metadata", {}).get("uid")
    body = dict(config_map, metadata=dict(config_map["metadata"]))
    if uid:  # the API server always sets it; garbage collection then removes the ConfigMap too
        body["metadata"]["ownerReferences"] = [
            {"apiVersion": f"{GROUP}/{VERSION}", "kind": "RayJob", "name": name, "uid": uid}
        ]
    try:
        with _api_errors(f"create ConfigMap {ns}/{body['metadata']['name']}"):
            core.create_namespaced_config_map(ns, body, field_validation="Strict")
    except ClusterError:
        with _api_errors(f"roll back RayJob {ns}/{name}"):
            custom.delete_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name)
        raise
    return created


def observe(api: Any, name: str, namespace: str) -> tuple[dict, list[dict], list[dict]]:
    """One look at a RayJob: ``(rayjob, pods of its cluster, pod events)`` as plain dicts.

    Raises:
        ClusterError: the RayJob does not exist or the API server refused.
    """
    from kubernetes import client

    custom, core = _apis(client, api)
    with _api_errors(f"read RayJob {namespace}/{name}"):
        rayjob = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
    cluster = (rayjob.get("status") or {}).get("rayClusterName")
    if not cluster:
        return rayjob, [], []
    with _api_errors(f"list pods of Ray cluster {namespace}/{cluster}"):
        pods = core.list_namespaced_pod(namespace, label_selector=f"ray.io/cluster={cluster}").items
        events = core.list_namespaced_event(
            namespace, field_selector="involvedObject.kind=Pod"
        ).items
    plain = api.sanitize_for_serialization
    return rayjob, [plain(p) for p in pods], [plain(e) for e in events]


def watch(
    api: Any,
    name: str,
    namespace: str,
    echo: Callable[[str], None],
    *,
    interval_s: float = 2.0,
    timeout_s: float | None = None,
) -> Snapshot:
    """Follow a RayJob until it finishes, echoing each change in plain words.

    Polls :func:`observe` every ``interval_s`` seconds (three GET requests) and prints what
    :func:`orchestrator.k8s.status.changes` reports: pods pending for GPUs with the scheduler's
    message, the job running with N workers, resizes, success, failure with its reason.

    Returns:
        The last snapshot (finished, or the one at ``timeout_s``).
    """
    prev: Snapshot | None = None
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        cur = snapshot(*observe(api, name, namespace))
        for line in changes(prev, cur):
            echo(line)
        if cur.finished or (deadline is not None and time.monotonic() >= deadline):
            return cur
        prev = cur
        time.sleep(interval_s)


def delete(api: Any, name: str, namespace: str) -> list[str]:
    """Delete a RayJob (KubeRay then deletes its RayCluster) and its job ConfigMap.

    Returns:
        What was deleted, as ``Kind/name`` strings.

    Raises:
        ClusterError: the RayJob does not exist or the API server refused.
    """
    from kubernetes import client

    custom, core = _apis(client, api)
    with _api_errors(f"delete RayJob {namespace}/{name}"):
        custom.delete_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, name, propagation_policy="Background"
        )
    deleted = [f"RayJob/{name}"]
    try:
        core.delete_namespaced_config_map(config_map_name(name), namespace)
        deleted.append(f"ConfigMap/{config_map_name(name)}")
    except client.ApiException as exc:
        if exc.status != 404:  # 404: garbage collection was faster, or it never existed
            raise ClusterError(
                _api_message(f"delete ConfigMap {config_map_name(name)}", exc)
            ) from None
    return deleted


def _apis(client: Any, api: Any) -> tuple[Any, Any]:
    """``(CustomObjectsApi, CoreV1Api)`` typed ``Any``: this module sends and receives plain dicts,
    which the client accepts and returns, while its generated stubs say ``object`` and model
    classes."""
    return client.CustomObjectsApi(api), client.CoreV1Api(api)


class _api_errors:
    """Context manager turning ``ApiException`` and connection errors into ``ClusterError``."""

    def __init__(self, action: str) -> None:
        self.action = action

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type, exc, tb) -> None:
        from kubernetes.client import ApiException
        from urllib3.exceptions import HTTPError

        if isinstance(exc, ApiException):
            raise ClusterError(_api_message(self.action, exc)) from None
        if isinstance(exc, HTTPError):
            raise ClusterError(
                f"{self.action}: cannot reach the Kubernetes API server ({exc}); "
                "check the kubeconfig's server address and your network"
            ) from None


def _api_message(action: str, exc: Any) -> str:
    import json

    try:
        detail = json.loads(exc.body).get("message") or exc.reason
    except (TypeError, ValueError, AttributeError):
        detail = exc.reason
    hint = {
        404: "it does not exist (check the name and --namespace)",
        409: "it exists already; delete it first (mla k8s delete NAME) or choose another --name",
        403: "forbidden; bind the Role in k8s/rbac.yaml to your user or service account",
        401: "not authenticated; refresh your kubeconfig credentials",
        422: "the API server rejected the object as invalid",
    }.get(exc.status, "")
    return f"{action}: HTTP {exc.status} {detail}" + (f"; {hint}" if hint else "")
