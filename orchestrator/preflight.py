"""Preflight: check, before any training starts, that the cluster's Python can run the job.

The submitter states what it expects (:class:`Expectations`: its Python version, the project's
runtime requirements with their pins, the modules the driver and workers import, the paths the
job reads, whether it needs CUDA); :mod:`orchestrator.cluster_probe` reports from every node of
the cluster, in the job's own runtime env; :func:`check_result` turns every mismatch into one
:class:`~orchestrator.contract.errors.ClusterError` that names what is missing, the nodes, and the two
fixes (run the nodes from the project's image, or pass a runtime env).

``mla submit`` runs the probe as a small job through the Job Submission API
(:func:`run_preflight_job`); ``mla train`` with ``cluster.address`` and ``mla tune --address`` run
it as tasks from their connected driver (:func:`preflight_connected`).
"""

from __future__ import annotations

import json
import platform
import time
import tomllib
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from orchestrator.cluster_probe import MARKER
from orchestrator.contract.errors import ClusterError

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DISTRIBUTION = "mla-train"
#: Extras whose requirements a cluster node needs ("" is the core list); dev tools are not.
RUNTIME_EXTRAS = ("", "train")
#: What the job's driver and workers import; tried on each node once every requirement is there.
IMPORTS = [
    "orchestrator.cli",
    "orchestrator.launcher",
    "workers.train_loop",
    "deepspeed",
    "ray.train.torch",
]
EXPECT_FILE = ".mla-preflight.json"
"""Name of the expectations file inside the uploaded working_dir."""

FIXES = (
    "Fix it one of two ways:\n"
    "  1. run every node from this project's image, which has all of it: `docker build --target gpu "
    "-t REGISTRY/mla-train:0.1.0-gpu .` (or --target cpu), push it, and start Ray inside it "
    "(KubeRay: set cluster.image, or `mla k8s render --image`); or\n"
    "  2. give the job a Ray runtime env: --set cluster.runtime_env.py_executable=/path/to/venv/bin/python "
    "(a virtual environment on every node, made with `scripts/install.sh /path/to/venv/bin/python --extras train`), "
    "or cluster.runtime_env.pip: [...] (installed by Ray for the job; see the README)"
)


@dataclass(frozen=True)
class Expectations:
    """What the submitter expects of every node.

    Attributes:
        python: ``major.minor`` of the submitting Python (Ray pickles code across the two).
        requirements: distribution name -> version specifier (``""`` when unpinned).
        ray_version: the submitter's Ray version (client and cluster must run the same Ray).
        paths: label (``data.path``, ``cluster.storage_path``) -> path as the job names it.
        local_paths: label -> whether the path exists on the submitting machine.
        use_gpu: the job wants GPUs (CUDA must be visible on the GPU nodes).
        timeout_s: seconds a node's probe may take, runtime-env setup included.
    """

    python: str
    requirements: dict[str, str]
    ray_version: str | None
    paths: dict[str, str] = field(default_factory=dict)
    local_paths: dict[str, bool] = field(default_factory=dict)
    use_gpu: bool = False
    timeout_s: float = 900.0

    def probe_input(self) -> dict:
        """The JSON document :func:`orchestrator.cluster_probe.probe_node` takes."""
        return {
            "distributions": list(self.requirements),
            "imports": IMPORTS,
            "paths": dict(self.paths),
            "use_gpu": self.use_gpu,
            "timeout_s": self.timeout_s,
        }


def project_requirements() -> dict[str, str]:
    """The project's runtime requirements (core and ``train`` extra), name -> specifier.

    Read from ``pyproject.toml`` beside the code when it is there (a checkout), else from the
    installed distribution's metadata.
    """
    from packaging.requirements import Requirement

    pyproject = PROJECT_ROOT / "pyproject.toml"
    if pyproject.is_file():
        project = tomllib.loads(pyproject.read_text())["project"]
        extras = project.get("optional-dependencies", {})
        lines = list(project.get("dependencies", [])) + [
            r for e in RUNTIME_EXTRAS if e for r in extras.get(e, [])
        ]
    else:
        lines = metadata.requires(DISTRIBUTION) or []
    out: dict[str, str] = {}
    for line in lines:
        req = Requirement(line)
        if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in RUNTIME_EXTRAS):
            out[req.name] = str(req.specifier)
    return out


def expectations(job, check_storage: bool) -> Expectations:
    """The :class:`Expectations` of ``job`` (a :class:`~orchestrator.config.JobConfig`).

    Args:
        job: the job as it will run on the cluster.
        check_storage: also require ``cluster.storage_path`` to exist on every node (when the
            user set it; the default folder is created by the driver).
    """
    paths: dict[str, str] = {}
    if job.data.path:
        paths["data.path"] = job.data.path
    storage = job.cluster.storage_path
    if check_storage and storage and "://" not in storage:
        paths["cluster.storage_path"] = storage
    rt = job.cluster.runtime_env
    try:
        ray_version = metadata.version("ray")
    except metadata.PackageNotFoundError:
        ray_version = None
    return Expectations(
        python=".".join(platform.python_version_tuple()[:2]),
        requirements=project_requirements(),
        ray_version=ray_version,
        paths=paths,
        local_paths={k: Path(v).expanduser().exists() for k, v in paths.items()},
        use_gpu=job.cluster.use_gpu,
        timeout_s=float((rt.setup_timeout_s if rt else 600) + 300),
    )


def node_problems(expect: Expectations, report: dict, gpus: float) -> tuple[list[str], list[str]]:
    """``(environment problems, path problems)`` of one node's probe report."""
    from packaging.specifiers import SpecifierSet

    env: list[str] = []
    have = report.get("python_version", "?")
    if ".".join(have.split(".")[:2]) != expect.python:
        env.append(f"Python {have} (the submitter runs {expect.python})")
    found = report.get("distributions", {})
    missing = sorted(name for name, v in found.items() if v is None)
    if missing:
        env.append("missing " + ", ".join(missing))
    for name, version in sorted(found.items()):
        spec = expect.requirements.get(name, "")
        if (
            version is not None
            and spec
            and not SpecifierSet(spec).contains(version, prereleases=True)
        ):
            env.append(f"{name} {version} (the project pins {name}{spec})")
    ray = found.get("ray")
    if (
        ray
        and expect.ray_version
        and ray != expect.ray_version
        and not any(e.startswith("ray ") for e in env)
    ):
        env.append(f"ray {ray} (the submitter runs ray {expect.ray_version}; they must match)")
    if report.get("import_error"):
        env.append(report["import_error"])
    cuda = report.get("cuda")
    if expect.use_gpu and gpus > 0 and cuda is not None and not cuda.get("available"):
        env.append(
            f"CUDA not visible to torch (torch built for CUDA {cuda.get('torch_cuda')}, "
            f"CUDA_VISIBLE_DEVICES={cuda.get('visible_devices')!r}) on a node with {gpus:g} GPU(s)"
        )
    paths = [label for label, ok in sorted(report.get("paths", {}).items()) if not ok]
    return env, paths


def check_result(expect: Expectations, result: dict) -> None:
    """Raise one :class:`ClusterError` for everything wrong in the probe ``result``.

    Args:
        expect: what was asked.
        result: ``{"nodes": [{"node_id", "resources", "report"}], "errors": [...]}`` from
            :func:`orchestrator.cluster_probe.probe_cluster` (``cluster_error`` when the probe
            job could not reach its cluster).

    Raises:
        ClusterError: a node lacks something, runs other versions, cannot see CUDA or the
            job's paths, or could not run the probe; nodes with the same problems share a line.
    """
    groups: dict[tuple, list[str]] = {}
    missing_paths: dict[str, list[str]] = {}
    for node in result.get("nodes", []):
        report = node["report"]
        env, paths = node_problems(expect, report, node.get("resources", {}).get("GPU", 0))
        if env:
            groups.setdefault(
                (report.get("python"), report.get("python_version"), tuple(env)), []
            ).append(report["ip"])
        for label in paths:
            missing_paths.setdefault(label, []).append(report["ip"])
    lines = [
        f"- node{'s' if len(ips) > 1 else ''} {', '.join(ips)} (python {py}, {ver}): {'; '.join(env)}"
        for (py, ver, env), ips in groups.items()
    ]
    lines += [
        f"- node {e.get('ip') or e['node_id'][:8]}: the probe could not run there: {e['error']}"
        for e in result.get("errors", [])
    ]
    if result.get("cluster_error"):
        lines.append(
            f"- the preflight job could not reach its own cluster: {result['cluster_error']}"
        )
    if (
        expect.use_gpu
        and result.get("nodes")
        and not any(n.get("resources", {}).get("GPU", 0) for n in result["nodes"])
    ):
        lines.append("- cluster.use_gpu is true but no node of the cluster advertises a GPU")
    path_lines = [_path_line(label, expect, ips) for label, ips in missing_paths.items()]
    if not lines and not path_lines:
        return
    text = "the cluster cannot run this job (checked before any training started):\n" + "\n".join(
        lines + path_lines
    )
    if lines:
        text += "\n" + FIXES
    raise ClusterError(text)


def _path_line(label: str, expect: Expectations, ips: list[str]) -> str:
    path = expect.paths[label]
    where = "exists on this machine but not" if expect.local_paths.get(label) else "does not exist"
    relative = (
        ""
        if Path(path).is_absolute()
        else " (a relative path is read from the job's working directory there)"
    )
    what = "the data" if label == "data.path" else "run folders and checkpoints"
    return (
        f"- {label} {path!r} {where} on node{'s' if len(ips) > 1 else ''} {', '.join(ips)} of the cluster"
        f"{relative}: {what} must be visible on the cluster: put {'it' if label == 'data.path' else 'them'} on "
        "storage every node mounts at the same path (NFS, a ReadWriteMany volume) and point "
        f"{label} at that absolute path"
        + (", or use an object-store URI (s3://...)" if label != "data.path" else "")
    )


def run_preflight_job(
    client, expect: Expectations, runtime_env: dict, python: str, submission_id: str, submit
) -> dict:
    """Run the probe as a Ray job with the job's runtime env and return its result.

    Args:
        client: a ``JobSubmissionClient``.
        expect: the expectations; already written as ``EXPECT_FILE`` into the working_dir.
        runtime_env: the job's runtime env (same upload, same environment as the real job).
        python: the entrypoint's Python command (:func:`orchestrator.runtime_env.driver_python`).
        submission_id: id of the probe job.
        submit: ``submit(client, **submit_job_kwargs)`` (retries while the head has no agent).

    Raises:
        ClusterError: the probe job failed without a report (its Python cannot start, the
            runtime env failed to install: Ray's message and the last log lines are included),
            or did not finish within ``expect.timeout_s``.
    """
    submit(
        client,
        entrypoint=f"{python} -m orchestrator.cluster_probe {EXPECT_FILE}",
        submission_id=submission_id,
        runtime_env=runtime_env,
        entrypoint_num_cpus=0,
        metadata={"mla_command": "preflight"},
    )
    deadline = time.time() + expect.timeout_s
    status = "PENDING"
    while time.time() < deadline:
        status = str(client.get_job_status(submission_id).value)
        if status in ("SUCCEEDED", "FAILED", "STOPPED"):
            break
        time.sleep(0.5)
    logs = client.get_job_logs(submission_id)
    for line in logs.splitlines():
        if line.startswith(MARKER):
            return json.loads(line[len(MARKER) :])
    if status not in ("SUCCEEDED", "FAILED", "STOPPED"):
        client.stop_job(submission_id)
    info = client.get_job_info(submission_id)
    tail = "\n".join(logs.strip().splitlines()[-15:]) or "(no log lines)"
    raise ClusterError(
        f"the preflight check could not run on the cluster (job {submission_id} {status}: "
        f"{(info.message or 'no message').strip()}); nothing was started. Last log lines:\n{tail}\n"
        "If a runtime env was being installed, its logs are in the message above (raise "
        "cluster.runtime_env.setup_timeout_s if it is only slow). " + FIXES
    )


def preflight_connected(job, check_storage: bool = True) -> None:
    """Probe every node from a driver already connected to ``cluster.address``.

    Raises:
        ClusterError: see :func:`check_result`.
    """
    from orchestrator.cluster_probe import probe_cluster

    expect = expectations(job, check_storage)
    check_result(expect, probe_cluster(expect.probe_input(), timeout_s=expect.timeout_s))
