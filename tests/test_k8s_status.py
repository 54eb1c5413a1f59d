"""RayJob status in plain words: pure function of (RayJob, pods, events)."""

from orchestrator.k8s.status import changes, report, snapshot

GPU_MSG = (
    "0/3 nodes are available: 3 Insufficient nvidia.com/gpu. preemption: 0/3 nodes are available"
)


def rayjob(state="", job_status="", **extra):
    status = {
        "jobDeploymentStatus": state,
        "jobStatus": job_status,
        "rayClusterName": "mla-x-abcde",
        **extra,
    }
    return {"metadata": {"name": "mla-x"}, "status": {k: v for k, v in status.items() if v != ""}}


def pod(
    name,
    node_type="worker",
    phase="Running",
    ready=True,
    gpus=1,
    cluster="mla-x-abcde",
    conditions=None,
):
    conds = (
        conditions
        if conditions is not None
        else (
            [
                {"type": "PodScheduled", "status": "True"},
                {"type": "Ready", "status": "True" if ready else "False"},
            ]
        )
    )
    return {
        "metadata": {
            "name": name,
            "labels": {"ray.io/cluster": cluster, "ray.io/node-type": node_type},
        },
        "spec": {
            "containers": [
                {"name": "ray-worker", "resources": {"limits": {"nvidia.com/gpu": str(gpus)}}}
            ]
        },
        "status": {"phase": phase, "conditions": conds},
    }


def unschedulable(name, message=GPU_MSG):
    return pod(
        name,
        phase="Pending",
        conditions=[
            {
                "type": "PodScheduled",
                "status": "False",
                "reason": "Unschedulable",
                "message": message,
            }
        ],
    )


def test_new_job_waits_for_operator():
    lines = report({"metadata": {"name": "mla-x"}}, [], [])
    assert lines == [
        "RayJob mla-x accepted; waiting for the KubeRay operator to create its Ray cluster"
    ]


def test_pending_workers_report_scheduler_message_and_gpus():
    lines = report(
        rayjob("Initializing"), [pod("h", "head"), unschedulable("w1"), unschedulable("w2")], []
    )
    assert f"2 worker pod(s) pending, waiting for GPUs: {GPU_MSG}" in lines


def test_pending_worker_without_condition_message_uses_latest_event():
    p = pod("w1", phase="Pending", conditions=[])
    events = [
        {
            "reason": "FailedScheduling",
            "involvedObject": {"kind": "Pod", "name": "w1"},
            "message": "old message nvidia.com/gpu",
            "lastTimestamp": "2025-01-01T00:00:00Z",
        },
        {
            "reason": "FailedScheduling",
            "involvedObject": {"kind": "Pod", "name": "w1"},
            "message": "0/5 nodes are available: 5 Insufficient nvidia.com/gpu.",
            "lastTimestamp": "2025-01-01T00:01:00Z",
        },
        {
            "reason": "FailedScheduling",
            "involvedObject": {"kind": "Pod", "name": "other"},
            "message": "newest but about another pod",
            "lastTimestamp": "2025-01-01T00:02:00Z",
        },
    ]
    lines = report(rayjob("Initializing"), [p], events)
    assert (
        lines[-1]
        == "1 worker pod(s) pending, waiting for GPUs: 0/5 nodes are available: 5 Insufficient nvidia.com/gpu."
    )


def test_pending_for_other_reasons_is_not_called_waiting_for_gpus():
    lines = report(
        rayjob("Initializing"),
        [unschedulable("w1", "0/2 nodes are available: 2 node(s) had untolerated taint")],
        [],
    )
    assert lines[-1].startswith("1 worker pod(s) pending, not schedulable: 0/2 nodes")


def test_head_image_pull_failure_is_reported():
    head = pod("h", "head", phase="Pending", ready=False)
    head["status"]["containerStatuses"] = [
        {"state": {"waiting": {"reason": "ImagePullBackOff", "message": "pull access denied"}}}
    ]
    assert "head pod cannot start: ImagePullBackOff: pull access denied" in report(
        rayjob("Initializing"), [head], []
    )


def test_running_counts_ready_workers_and_their_gpus():
    pods = [
        pod("h", "head", gpus=0),
        pod("w1", gpus=2),
        pod("w2", gpus=2),
        pod("w3", ready=False, gpus=2),
        pod("x", cluster="someone-else", gpus=8),
    ]
    snap = snapshot(rayjob("Running", "RUNNING"), pods, [])
    assert (snap.workers_running, snap.gpus_running) == (2, 4)
    assert snap.facts["workers_running"] == "job running with 2 worker pod(s), 4 GPU(s)"


def test_resize_is_reported_once_with_old_and_new_sizes():
    before = snapshot(rayjob("Running", "RUNNING"), [pod("w1"), pod("w2")], [])
    after = snapshot(rayjob("Running", "RUNNING"), [pod("w1"), pod("w2"), pod("w3"), pod("w4")], [])
    lines = changes(before, after)
    assert lines[0] == "resize: 2 -> 4 worker pod(s) (2 -> 4 GPUs)"
    assert lines[1:] == ["job running with 4 worker pod(s), 4 GPU(s)"]
    assert changes(after, after) == []


def test_scale_up_from_nothing_is_not_a_resize():
    before = snapshot(rayjob("Running", "RUNNING"), [], [])
    after = snapshot(rayjob("Running", "RUNNING"), [pod("w1")], [])
    assert not any(line.startswith("resize") for line in changes(before, after))


def test_success_reports_duration():
    job = rayjob(
        "Complete", "SUCCEEDED", startTime="2025-01-01T10:00:00Z", endTime="2025-01-01T11:02:03Z"
    )
    snap = snapshot(job, [], [])
    assert snap.finished and snap.succeeded
    assert snap.facts["deployment"] == "RayJob mla-x succeeded after 1h02m03s"


def test_failure_reports_reason_and_message():
    job = rayjob(
        "Failed",
        "FAILED",
        reason="AppFailed",
        message="Job entrypoint command failed with exit code 1",
    )
    snap = snapshot(job, [], [])
    assert snap.finished and not snap.succeeded
    assert snap.facts["deployment"] == (
        "RayJob mla-x failed (FAILED): AppFailed: Job entrypoint command failed with exit code 1"
    )


def test_deadline_failure_without_job_status():
    job = rayjob(
        "Failed",
        reason="DeadlineExceeded",
        message="The RayJob has passed the activeDeadlineSeconds.",
    )
    assert "failed (no Ray job status): DeadlineExceeded: The RayJob" in report(job, [], [])[0]


def test_validation_failure_is_terminal():
    snap = snapshot(
        rayjob("ValidationFailed", message="RayJob name should be no more than 47 characters"),
        [],
        [],
    )
    assert snap.finished and not snap.succeeded
    assert snap.facts["deployment"].endswith(
        "rejected by KubeRay: RayJob name should be no more than 47 characters"
    )


def test_failed_worker_pod_shows_exit_code():
    dead = pod("w1", phase="Failed")
    dead["status"]["containerStatuses"] = [
        {"state": {"terminated": {"exitCode": 137, "reason": "OOMKilled"}}}
    ]
    assert "1 worker pod(s) failed: w1 exited 137 (OOMKilled)" in report(
        rayjob("Running", "RUNNING"), [dead], []
    )
