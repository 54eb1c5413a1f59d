"""A real two-node Ray cluster for tests: `ray start --head` plus a second `ray start --address`
node process with its own CPU, with token authentication on. The two nodes live on two loopback
addresses (127.0.0.2 and 127.0.0.3): Ray rewrites 127.0.0.1 to the machine's external address,
but leaves other loopback addresses alone, so all traffic stays on this machine.

Every process the cluster starts is stopped at the end, even when the test fails: each
`ray start --block` runs in its own session; teardown sends SIGTERM to it (Ray then stops the
node's processes), then SIGKILL to the whole process group and to any process still naming the
cluster's GCS port."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from orchestrator.launcher import free_port

RAY = str(Path(sys.executable).with_name("ray"))
HEAD_IP, SECOND_IP = "127.0.0.2", "127.0.0.3"


@dataclass
class Cluster:
    address: str  # dashboard / Job Submission API URL
    gcs_address: str
    token_file: Path
    env: dict


def _count_nodes(gcs: str, env: dict) -> int:
    out = subprocess.run(
        [RAY, "status", f"--address={gcs}"], capture_output=True, text=True, env=env, timeout=60
    )
    active = out.stdout.split("Active:", 1)[-1].split("Pending:", 1)[0]
    return active.count("node_")


@contextmanager
def ray_cluster(tmp: Path, head_cpus: int = 1, worker_cpus: int = 1, bin_dir: Path | None = None):
    """Start the cluster, yield a :class:`Cluster`, stop everything it started.

    ``bin_dir`` is the virtual environment whose ``ray`` starts the nodes and whose ``python``
    is first on their ``PATH`` (default: this test run's own environment).
    """
    bin_dir = bin_dir or Path(sys.executable).parent
    ray = str(bin_dir / "ray")
    token = tmp / "auth_token"
    token.write_text(uuid.uuid4().hex)
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token),
        # the nodes run jobs with this virtual environment's python, as an activated venv would
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    env.pop("PYTHONPATH", None)  # the nodes' Python sees only its own packages
    env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)
    env.pop("RAY_ADDRESS", None)
    gcs_port, dash_port = free_port(""), free_port("")
    gcs = f"{HEAD_IP}:{gcs_port}"
    common = ["--block", "--object-store-memory=100000000", "--disable-usage-stats"]
    # Each node's dashboard agent serves the Job Submission API on a fixed default port (52365)
    # that another cluster on the same address would hold: give every node a free one.
    procs: list[subprocess.Popen] = []
    try:
        procs.append(
            _start(
                [
                    ray,
                    "start",
                    "--head",
                    f"--node-ip-address={HEAD_IP}",
                    f"--port={gcs_port}",
                    f"--dashboard-host={HEAD_IP}",
                    f"--dashboard-port={dash_port}",
                    "--include-dashboard=true",
                    f"--num-cpus={head_cpus}",
                    f"--dashboard-agent-listen-port={free_port('')}",
                    *common,
                ],
                env,
                tmp / "head.log",
            )
        )
        _wait(lambda: _count_nodes(gcs, env) >= 1, 120, "head node", tmp / "head.log")
        procs.append(
            _start(
                [
                    ray,
                    "start",
                    f"--address={gcs}",
                    f"--node-ip-address={SECOND_IP}",
                    f"--num-cpus={worker_cpus}",
                    f"--dashboard-agent-listen-port={free_port('')}",
                    '--resources={"second_node": 1}',
                    *common,
                ],
                env,
                tmp / "worker.log",
            )
        )
        _wait(lambda: _count_nodes(gcs, env) >= 2, 120, "second node", tmp / "worker.log")
        yield Cluster(f"http://{HEAD_IP}:{dash_port}", gcs, token, env)
    finally:
        _stop(procs, gcs_port)


def _start(cmd: list[str], env: dict, log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        cmd, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True
    )


def _wait(predicate, timeout: float, what: str, log: Path) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(1)
    raise TimeoutError(f"{what} did not start in {timeout}s; log:\n{log.read_text()[-3000:]}")


def _stop(procs: list[subprocess.Popen], gcs_port: int) -> None:
    for proc in reversed(procs):
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
    for proc in reversed(procs):
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    subprocess.run(["pkill", "-9", "-f", f"{HEAD_IP}:{gcs_port}"], check=False)
