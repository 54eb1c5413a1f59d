"""submit / status / delete end to end over HTTP against a local Kubernetes API test server.

The server is kmock's ``KubernetesEmulator`` (an aiohttp HTTP server that stores objects and
serves create/get/list/watch/patch/delete) started in a thread of the test process; the code
under test talks to it with the official ``kubernetes`` client through a kubeconfig file. The
tests play the KubeRay operator and the kubelet through the same HTTP API: they patch the
RayJob status, create and update pods, and post scheduler events.
"""

from __future__ import annotations

import asyncio
import threading

import pytest
import yaml
from typer.testing import CliRunner

from orchestrator.cli import app
from orchestrator.config import load_job_config
from orchestrator.contract.errors import ClusterError
from orchestrator.k8s import client as k8s
from orchestrator.k8s.render import RenderOptions, render_job

kmock = pytest.importorskip("kmock")
from kubernetes import client as kclient  # noqa: E402

GPU_SMALL = "tests/k8s_configs/gpu_small.yaml"
NS = "ml"
GPU_MSG = "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."


class ApiServer:
    """kmock's Kubernetes emulator on 127.0.0.1 in a background thread with its own event loop."""

    def __init__(self) -> None:
        self._ready = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    def __enter__(self) -> ApiServer:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("kmock server did not start")
        return self

    def __exit__(self, *exc) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    async def _main(self) -> None:
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        async with kmock.KubernetesEmulator() as emulator, kmock.Server(emulator) as server:
            for plural, kind in [
                ("ray.io/v1/rayjobs", "RayJob"),
                ("ray.io/v1/rayclusters", "RayCluster"),
                ("v1/pods", "Pod"),
                ("v1/events", "Event"),
                ("v1/configmaps", "ConfigMap"),
            ]:
                emulator.resources[plural] = kmock.ResourceInfo(
                    kind=kind, namespaced=True, subresources={"status"}
                )
            self.url = str(server.url).rstrip("/")
            self._ready.set()
            await self._stop.wait()


@pytest.fixture()
def server(tmp_path):
    with ApiServer() as srv:
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "current-context": "test",
                    "clusters": [{"name": "test", "cluster": {"server": srv.url}}],
                    "users": [{"name": "me", "user": {"token": "test-token"}}],
                    "contexts": [
                        {
                            "name": "test",
                            "context": {"cluster": "test", "user": "me", "namespace": NS},
                        }
                    ],
                }
            )
        )
        srv.kubeconfig = str(kubeconfig)
        yield srv


class Operator:
    """Plays KubeRay, the scheduler and the kubelet through the HTTP API."""

    def __init__(self, url: str, name: str) -> None:
        api = kclient.ApiClient(kclient.Configuration(host=url))
        self.custom, self.core, self.name = (
            kclient.CustomObjectsApi(api),
            kclient.CoreV1Api(api),
            name,
        )
        self.cluster = f"{name}-x7k2p"

    def status(self, **status) -> None:
        self.custom.patch_namespaced_custom_object_status(
            "ray.io", "v1", NS, "rayjobs", self.name, {"status": status}
        )

    def pod(self, name: str, node_type: str = "worker", scheduled: bool = True) -> None:
        body = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": name,
                "namespace": NS,
                "labels": {"ray.io/cluster": self.cluster, "ray.io/node-type": node_type},
            },
            "spec": {
                "containers": [
                    {
                        "name": "ray",
                        "image": "img",
                        "resources": {
                            "limits": {"nvidia.com/gpu": "2" if node_type == "worker" else "0"}
                        },
                    }
                ]
            },
            "status": {
                "phase": "Pending",
                "conditions": []
                if scheduled
                else [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable"}],
            },
        }
        self.core.create_namespaced_pod(NS, body)

    def running(self, name: str) -> None:
        self.core.patch_namespaced_pod_status(
            name,
            NS,
            {
                "status": {
                    "phase": "Running",
                    "conditions": [
                        {"type": "PodScheduled", "status": "True"},
                        {"type": "Ready", "status": "True"},
                    ],
                }
            },
        )

    def failed_scheduling(self, pod: str, message: str = GPU_MSG) -> None:
        self.core.create_namespaced_event(
            NS,
            {
                "apiVersion": "v1",
                "kind": "Event",
                "metadata": {"name": f"{pod}.1", "namespace": NS},
                "involvedObject": {"kind": "Pod", "name": pod, "namespace": NS},
                "reason": "FailedScheduling",
                "message": message,
                "type": "Warning",
                "lastTimestamp": "2025-01-01T00:00:00Z",
            },
        )


def _objects(name="mla-gpu-small"):
    return render_job(
        load_job_config(GPU_SMALL), RenderOptions(gpus_per_worker=2, namespace=NS, name=name)
    )


def _follow(server, name, steps, monkeypatch):
    """Run k8s.watch in this thread while a driver thread applies ``steps``, one per poll.

    A step (several requests) and a poll never overlap: both hold one lock. The driver applies
    the next step only after a poll has seen the previous one, so every state is observed once.
    """
    lines: list[str] = []
    polls = [0]
    tick = threading.Condition()
    observe = k8s.observe

    def counted_observe(*args):
        with tick:
            result = observe(*args)
            polls[0] += 1
            tick.notify_all()
        return result

    def drive() -> None:
        seen = 0
        for step in steps:
            with tick:
                tick.wait_for(lambda seen=seen: polls[0] > seen, timeout=10)
                step()
                seen = polls[0]

    monkeypatch.setattr(k8s, "observe", counted_observe)
    api = k8s.connect(server.kubeconfig)
    driver = threading.Thread(target=drive, daemon=True)
    driver.start()
    snap = k8s.watch(api, name, NS, lines.append, interval_s=0.02, timeout_s=30)
    driver.join(10)
    return snap, lines


def test_submit_creates_rayjob_and_configmap_over_http(server):
    api = k8s.connect(server.kubeconfig)
    created = k8s.submit(api, _objects())
    assert created["metadata"]["name"] == "mla-gpu-small"
    custom, core = kclient.CustomObjectsApi(api), kclient.CoreV1Api(api)
    stored = custom.get_namespaced_custom_object("ray.io", "v1", NS, "rayjobs", "mla-gpu-small")
    assert stored["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["maxReplicas"] == 8
    cm = core.read_namespaced_config_map("mla-gpu-small-job", NS)
    assert yaml.safe_load(cm.data["job.yaml"])["parallel"] == {"tensor": 2}
    with pytest.raises(ClusterError, match="HTTP 409.*exists already"):
        k8s.submit(api, _objects())


def test_watch_reports_pending_running_resize_and_success(server, monkeypatch):
    api = k8s.connect(server.kubeconfig)
    k8s.submit(api, _objects())
    op = Operator(server.url, "mla-gpu-small")
    steps = [
        lambda: op.status(jobDeploymentStatus="Initializing", rayClusterName=op.cluster),
        lambda: (
            op.pod("head", "head"),
            op.running("head"),
            op.pod("w1", scheduled=False),
            op.pod("w2", scheduled=False),
            op.failed_scheduling("w1"),
            op.failed_scheduling("w2"),
        ),
        lambda: (
            op.running("w1"),
            op.running("w2"),
            op.status(jobDeploymentStatus="Running", jobStatus="RUNNING"),
        ),
        lambda: (op.pod("w3"), op.pod("w4"), op.running("w3"), op.running("w4")),
        lambda: op.status(
            jobDeploymentStatus="Complete",
            jobStatus="SUCCEEDED",
            startTime="2025-01-01T10:00:00Z",
            endTime="2025-01-01T10:20:00Z",
        ),
    ]
    snap, lines = _follow(server, "mla-gpu-small", steps, monkeypatch)
    assert snap.succeeded
    expected = [
        "RayJob mla-gpu-small accepted; waiting for the KubeRay operator to create its Ray cluster",
        "RayJob mla-gpu-small: starting Ray cluster mla-gpu-small-x7k2p",
        f"2 worker pod(s) pending, waiting for GPUs: {GPU_MSG}",
        "RayJob mla-gpu-small: Ray job RUNNING on cluster mla-gpu-small-x7k2p",
        "job running with 2 worker pod(s), 4 GPU(s)",
        "resize: 2 -> 4 worker pod(s) (4 -> 8 GPUs)",
        "job running with 4 worker pod(s), 8 GPU(s)",
        "RayJob mla-gpu-small succeeded after 0h20m00s",
    ]
    assert lines == expected


def test_failed_job_is_reported_with_reason_and_cli_exits_nonzero(server):
    api = k8s.connect(server.kubeconfig)
    k8s.submit(api, _objects())
    op = Operator(server.url, "mla-gpu-small")
    op.status(
        jobDeploymentStatus="Failed",
        jobStatus="FAILED",
        rayClusterName=op.cluster,
        reason="AppFailed",
        message="Job entrypoint command failed with exit code 1",
    )
    result = CliRunner().invoke(
        app,
        [
            "k8s",
            "status",
            "mla-gpu-small",
            "-n",
            NS,
            "--kubeconfig",
            server.kubeconfig,
            "--watch",
            "--interval",
            "0.05",
            "--json",
        ],
    )
    assert result.exit_code == 1
    assert isinstance(
        result.exception, Exception
    ) and "AppFailed: Job entrypoint command failed" in str(result.exception)
    assert '"deployment": "Failed"' in result.stdout


def test_cli_submit_status_delete(server):
    runner = CliRunner()
    base = ["-n", NS, "--kubeconfig", server.kubeconfig]
    result = runner.invoke(app, ["k8s", "submit", GPU_SMALL, "-g", "2", "--no-watch", *base])
    assert result.exit_code == 0, result.output
    Operator(server.url, "mla-gpu-small").status(
        jobDeploymentStatus="Initializing", rayClusterName="c"
    )
    result = runner.invoke(app, ["k8s", "status", "mla-gpu-small", "--json", *base])
    assert result.exit_code == 0, result.output
    assert "starting Ray cluster c" in result.stdout
    result = runner.invoke(app, ["k8s", "delete", "mla-gpu-small", *base])
    assert result.exit_code == 0, result.output
    api = k8s.connect(server.kubeconfig)
    with pytest.raises(ClusterError, match="HTTP 404"):
        k8s.observe(api, "mla-gpu-small", NS)
    with pytest.raises(kclient.ApiException):
        kclient.CoreV1Api(api).read_namespaced_config_map("mla-gpu-small-job", NS)
    with pytest.raises(ClusterError, match="delete RayJob ml/mla-gpu-small: HTTP 404"):
        k8s.delete(api, "mla-gpu-small", NS)


def test_unreachable_server_is_a_cluster_error(tmp_path):
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "current-context": "t",
                "clusters": [{"name": "t", "cluster": {"server": "http://127.0.0.1:9"}}],
                "users": [{"name": "u", "user": {}}],
                "contexts": [{"name": "t", "context": {"cluster": "t", "user": "u"}}],
            }
        )
    )
    api = k8s.connect(str(kubeconfig))
    api.configuration.retries = 0
    with pytest.raises(ClusterError, match="cannot reach the Kubernetes API server"):
        k8s.observe(api, "x", NS)


def test_missing_kubeconfig_is_a_cluster_error(tmp_path, monkeypatch):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(ClusterError, match="--kubeconfig .*nope does not exist"):
        k8s.connect(str(tmp_path / "nope"))
    empty = tmp_path / "empty"
    empty.write_text("")
    with pytest.raises(ClusterError, match="cannot load Kubernetes credentials"):
        k8s.connect(str(empty))
