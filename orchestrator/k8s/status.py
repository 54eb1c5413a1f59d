"""RayJob status in plain words: a pure function of (RayJob, pods, events).

Objects are plain dicts in the API server's JSON form (camelCase), as returned by
``CustomObjectsApi`` or by ``ApiClient.sanitize_for_serialization`` for typed objects. The fields
read here are KubeRay v1's ``RayJob.status`` (``jobDeploymentStatus``, ``jobStatus``,
``rayClusterName``, ``reason``, ``message``, ``startTime``, ``endTime``, ``failed``), the labels
KubeRay puts on its pods (``ray.io/cluster``, ``ray.io/node-type``) and the scheduler's
``FailedScheduling`` events.

:func:`snapshot` condenses one observation into facts, each a line of text under a key;
:func:`changes` says what is new between two snapshots (the watch loop prints that), and
:func:`report` prints every fact of one snapshot (``mla k8s status``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

TERMINAL_DEPLOYMENT = ("Complete", "Failed", "ValidationFailed")
"""``jobDeploymentStatus`` values after which KubeRay changes nothing more."""


@dataclass(frozen=True)
class Snapshot:
    """One observation of a RayJob and its pods.

    Attributes:
        name: RayJob name.
        deployment: ``status.jobDeploymentStatus`` ('' before the operator saw the job).
        job_status: ``status.jobStatus`` of the Ray job (PENDING, RUNNING, SUCCEEDED, FAILED...).
        workers_running: Worker pods Running and ready.
        gpus_running: ``nvidia.com/gpu`` requested by the running worker pods.
        facts: Ordered ``{key: line}``; a line is printed again only when its text changes.
    """

    name: str
    deployment: str = ""
    job_status: str = ""
    workers_running: int = 0
    gpus_running: int = 0
    facts: dict[str, str] = field(default_factory=dict)

    @property
    def finished(self) -> bool:
        """True once KubeRay will not change the job any more."""
        return self.deployment in TERMINAL_DEPLOYMENT

    @property
    def succeeded(self) -> bool:
        return self.deployment == "Complete" and self.job_status == "SUCCEEDED"

    @property
    def lines(self) -> list[str]:
        """Every fact as a line, in order (what ``mla k8s status NAME`` prints)."""
        return list(self.facts.values())


def snapshot(rayjob: dict, pods: list[dict], events: list[dict]) -> Snapshot:
    """Condense a RayJob, the pods of its cluster and the namespace's events into facts.

    Args:
        rayjob: the RayJob object.
        pods: pods of the namespace (those of other clusters are ignored).
        events: events of the namespace (only those about this RayJob and its pods are read).
    """
    name = rayjob.get("metadata", {}).get("name", "?")
    status = rayjob.get("status") or {}
    cluster = status.get("rayClusterName")
    mine = [p for p in pods if cluster and _labels(p).get("ray.io/cluster") == cluster]
    heads = [p for p in mine if _labels(p).get("ray.io/node-type") == "head"]
    workers = [p for p in mine if _labels(p).get("ray.io/node-type") == "worker"]
    running = [p for p in workers if _is_ready(p)]
    facts = {"deployment": _deployment_line(name, status)}
    for pod in heads:
        if line := _pod_problem(pod, events):
            facts["head"] = f"head pod {line}"
    pending = [p for p in workers if (p.get("status") or {}).get("phase", "Pending") == "Pending"]
    if pending:
        facts["workers_pending"] = _pending_line(pending, events)
    failed = [p for p in workers if (p.get("status") or {}).get("phase") == "Failed"]
    if failed:
        facts["workers_failed"] = f"{len(failed)} worker pod(s) failed: " + "; ".join(
            _failure(p) for p in failed
        )
    gpus = sum(_gpus(p) for p in running)
    if status.get("jobDeploymentStatus") == "Running" or running:
        facts["workers_running"] = f"job running with {len(running)} worker pod(s), {gpus} GPU(s)"
    return Snapshot(
        name=name,
        deployment=status.get("jobDeploymentStatus", ""),
        job_status=status.get("jobStatus", ""),
        workers_running=len(running),
        gpus_running=gpus,
        facts=facts,
    )


def changes(prev: Snapshot | None, cur: Snapshot) -> list[str]:
    """Lines worth printing when ``cur`` follows ``prev`` (all of ``cur`` when there is none).

    A change in the number of running workers while the job runs is reported as a resize.
    """
    old = prev.facts if prev else {}
    lines = []
    if (
        prev is not None
        and prev.deployment == "Running"
        and cur.deployment == "Running"
        and prev.workers_running
        and prev.workers_running != cur.workers_running
    ):
        lines.append(
            f"resize: {prev.workers_running} -> {cur.workers_running} worker pod(s) "
            f"({prev.gpus_running} -> {cur.gpus_running} GPUs)"
        )
    lines += [text for key, text in cur.facts.items() if old.get(key) != text]
    return lines


def report(rayjob: dict, pods: list[dict], events: list[dict]) -> list[str]:
    """Every fact about the job now (``mla k8s status NAME``)."""
    return snapshot(rayjob, pods, events).lines


# ----------------------------------------------------------------------------- helpers
def _deployment_line(name: str, status: dict) -> str:
    state = status.get("jobDeploymentStatus", "")
    cluster = status.get("rayClusterName") or "(not created yet)"
    reason = ": ".join(x for x in (status.get("reason"), status.get("message")) if x)
    if state in ("", "New"):
        return f"RayJob {name} accepted; waiting for the KubeRay operator to create its Ray cluster"
    if state == "Initializing":
        return f"RayJob {name}: starting Ray cluster {cluster}"
    if state == "Running":
        return f"RayJob {name}: Ray job {status.get('jobStatus') or 'PENDING'} on cluster {cluster}"
    if state == "Complete" and status.get("jobStatus") == "SUCCEEDED":
        return f"RayJob {name} succeeded{_duration(status)}"
    if state in ("Complete", "Failed"):
        job_state = status.get("jobStatus") or "no Ray job status"
        return (
            f"RayJob {name} failed ({job_state}){_duration(status)}: {reason or 'no reason given'}"
        )
    if state == "ValidationFailed":
        return f"RayJob {name} rejected by KubeRay: {reason or 'invalid spec'}"
    if state == "Retrying":
        return f"RayJob {name}: attempt failed ({status.get('failed', '?')} so far), retrying on a new cluster"
    if state in ("Suspended", "Suspending"):
        return f"RayJob {name} {state.lower()} (a queue such as Kueue has not admitted it yet, or it was suspended)"
    return f"RayJob {name}: {state}" + (f": {reason}" if reason else "")


def _pending_line(pending: list[dict], events: list[dict]) -> str:
    messages = [m for m in (_unschedulable(p, events) for p in pending) if m]
    if messages:
        waiting = (
            "waiting for GPUs"
            if any("nvidia.com/gpu" in m for m in messages)
            else "not schedulable"
        )
        return f"{len(pending)} worker pod(s) pending, {waiting}: {messages[-1]}"
    problems = [m for m in (_pod_problem(p, events) for p in pending) if m]
    return f"{len(pending)} worker pod(s) starting" + (f": {problems[-1]}" if problems else "")


def _pod_problem(pod: dict, events: list[dict]) -> str | None:
    """Why a head pod is not running yet, or None when it runs."""
    status = pod.get("status") or {}
    if message := _unschedulable(pod, events):
        return f"pending, not schedulable: {message}"
    for cs in status.get("containerStatuses") or []:
        waiting = (cs.get("state") or {}).get("waiting")
        if waiting and waiting.get("reason") not in (None, "ContainerCreating", "PodInitializing"):
            return f"cannot start: {waiting['reason']}: {waiting.get('message', '')}".rstrip(": ")
    if status.get("phase") == "Failed":
        return f"failed: {_failure(pod)}"
    return None


def _unschedulable(pod: dict, events: list[dict]) -> str | None:
    """The scheduler's message for a pod it could not place (condition, else latest event)."""
    for cond in (pod.get("status") or {}).get("conditions") or []:
        if cond.get("type") == "PodScheduled" and cond.get("status") == "False":
            if cond.get("message"):
                return cond["message"]
            break
    else:
        if (pod.get("status") or {}).get("phase", "Pending") != "Pending":
            return None
    name = pod.get("metadata", {}).get("name")
    mine = [
        e
        for e in events
        if e.get("reason") == "FailedScheduling"
        and (e.get("involvedObject") or {}).get("name") == name
    ]
    return max(mine, key=_event_time).get("message") if mine else None


def _event_time(event: dict) -> str:
    return str(
        event.get("lastTimestamp")
        or event.get("eventTime")
        or event.get("metadata", {}).get("creationTimestamp")
        or ""
    )


def _failure(pod: dict) -> str:
    status = pod.get("status") or {}
    for cs in status.get("containerStatuses") or []:
        term = (cs.get("state") or {}).get("terminated")
        if term:
            return f"{pod['metadata']['name']} exited {term.get('exitCode')} ({term.get('reason', 'Error')})"
    return f"{pod['metadata']['name']} {status.get('reason', 'failed')}: {status.get('message', '')}".rstrip(
        ": "
    )


def _is_ready(pod: dict) -> bool:
    status = pod.get("status") or {}
    ready = any(
        c.get("type") == "Ready" and c.get("status") == "True"
        for c in status.get("conditions") or []
    )
    return status.get("phase") == "Running" and (ready or not status.get("conditions"))


def _gpus(pod: dict) -> int:
    total = 0
    for c in (pod.get("spec") or {}).get("containers") or []:
        limits = (c.get("resources") or {}).get("limits") or {}
        total += int(limits.get("nvidia.com/gpu", 0))
    return total


def _labels(obj: dict) -> dict:
    return (obj.get("metadata") or {}).get("labels") or {}


def _duration(status: dict) -> str:
    try:
        start = datetime.fromisoformat(status["startTime"].replace("Z", "+00:00"))
        end = datetime.fromisoformat(status["endTime"].replace("Z", "+00:00"))
    except (KeyError, AttributeError, ValueError):
        return ""
    seconds = int((end - start).total_seconds())
    return f" after {seconds // 3600}h{seconds // 60 % 60:02d}m{seconds % 60:02d}s"
