"""``mla k8s``: render, submit, status, delete and validate KubeRay RayJobs.

Manifests go to stdout (or ``--output``); progress in plain words goes to stderr.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from orchestrator.cli_common import SetOption, err
from orchestrator.contract.errors import ConfigError, JobFailedError

app = typer.Typer(no_args_is_help=True, add_completion=False)

_CONFIG = typer.Argument(..., help="Job YAML, e.g. configs/tiny.yaml.")
_GPUS_PER_WORKER = typer.Option(1, "--gpus-per-worker", "-g", min=1, help="GPUs per worker pod.")
_MIN_GPUS = typer.Option(
    None,
    "--min-gpus",
    min=1,
    help="Fewest GPUs to run on (default: cluster.min_workers or num_workers).",
)
_MAX_GPUS = typer.Option(
    None, "--max-gpus", min=1, help="Most GPUs to use (default: cluster.num_workers)."
)
_IMAGE = typer.Option(
    None, "--image", help="Container image with mla-train installed (default: cluster.image)."
)
_NAMESPACE = typer.Option("default", "--namespace", "-n", help="Kubernetes namespace.")
_NAME = typer.Option(None, "--name", help="RayJob name (default: mla-<run.name>).")
_QUEUE = typer.Option(
    None, "--queue", help="Kueue LocalQueue (adds the kueue.x-k8s.io/queue-name label)."
)
_STORAGE = typer.Option(
    "/mnt/checkpoints", "--storage-path", help="Shared checkpoint folder or URI."
)
_PVC = typer.Option(
    "mla-checkpoints", "--pvc", help="ReadWriteMany claim mounted at --storage-path."
)
_NODE_SELECTOR = typer.Option(
    None, "--node-selector", help="KEY=VALUE node label for GPU workers (repeatable)."
)
_TTL = typer.Option(600, "--ttl", min=0, help="Seconds the finished cluster is kept.")
_BACKOFF = typer.Option(
    0, "--backoff-limit", min=0, help="Retries of a failed job on a fresh cluster."
)
_DEADLINE = typer.Option(
    None, "--deadline", min=1, help="Wall-clock limit of the RayJob, in seconds."
)
_KUBECONFIG = typer.Option(
    None,
    "--kubeconfig",
    help="kubeconfig file (default: $KUBECONFIG, ~/.kube/config or in-cluster).",
)
_CONTEXT = typer.Option(None, "--context", help="kubeconfig context.")
_INTERVAL = typer.Option(2.0, "--interval", min=0.01, help="Seconds between status polls.")


def _objects(
    config,
    set_,
    gpus_per_worker,
    min_gpus,
    max_gpus,
    image,
    namespace,
    name,
    queue,
    storage_path,
    pvc,
    node_selector,
    ttl,
    backoff_limit,
    deadline,
) -> list[dict]:
    from orchestrator.config import load_job_config
    from orchestrator.k8s.render import RenderOptions, render_job

    job = load_job_config(config, set_ or [])
    opts = RenderOptions(
        gpus_per_worker=gpus_per_worker,
        min_gpus=min_gpus,
        max_gpus=max_gpus,
        image=image,
        namespace=namespace,
        name=name,
        queue=queue,
        storage_path=storage_path,
        checkpoint_pvc=pvc,
        node_selector=_pairs(node_selector or []),
        ttl_seconds_after_finished=ttl,
        backoff_limit=backoff_limit,
        active_deadline_seconds=deadline,
    )
    return render_job(job, opts)


def _pairs(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(
                f"--node-selector {item!r}: expected KEY=VALUE, e.g. "
                "--node-selector nvidia.com/gpu.product=NVIDIA-H100-80GB-HBM3"
            )
        out[key] = value
    return out


@app.command()
def render(
    config: str = _CONFIG,
    set_: Optional[list[str]] = SetOption,
    gpus_per_worker: int = _GPUS_PER_WORKER,
    min_gpus: Optional[int] = _MIN_GPUS,
    max_gpus: Optional[int] = _MAX_GPUS,
    image: Optional[str] = _IMAGE,
    namespace: str = _NAMESPACE,
    name: Optional[str] = _NAME,
    queue: Optional[str] = _QUEUE,
    storage_path: str = _STORAGE,
    pvc: str = _PVC,
    node_selector: Optional[list[str]] = _NODE_SELECTOR,
    ttl: int = _TTL,
    backoff_limit: int = _BACKOFF,
    deadline: Optional[int] = _DEADLINE,
    output: Optional[Path] = typer.Option(
        None, "--output", "-o", help="Write the YAML here instead of stdout."
    ),
) -> None:
    """Render the ConfigMap and RayJob (with its autoscaled RayCluster) for a job config."""
    from orchestrator.k8s.render import to_yaml

    objs = _objects(
        config,
        set_,
        gpus_per_worker,
        min_gpus,
        max_gpus,
        image,
        namespace,
        name,
        queue,
        storage_path,
        pvc,
        node_selector,
        ttl,
        backoff_limit,
        deadline,
    )
    text = to_yaml(objs)
    if output:
        _write_atomic(output, text)
        err.print(f"wrote {output}")
    else:
        sys.stdout.write(text)


def _write_atomic(path: Path, text: str) -> None:
    """Write ``text`` through a temporary file and a rename (no half-written manifest).

    Raises:
        ConfigError: the folder does not exist or is not writable (names --output).
    """
    import os

    from orchestrator.contract.errors import ConfigError

    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True) if tmp.parent.is_dir() else None
        raise ConfigError(
            f"--output {str(path)!r}: cannot write it ({exc.strerror}); pass a path in an existing, "
            "writable folder"
        ) from None


@app.command()
def submit(
    config: str = _CONFIG,
    set_: Optional[list[str]] = SetOption,
    gpus_per_worker: int = _GPUS_PER_WORKER,
    min_gpus: Optional[int] = _MIN_GPUS,
    max_gpus: Optional[int] = _MAX_GPUS,
    image: Optional[str] = _IMAGE,
    namespace: str = _NAMESPACE,
    name: Optional[str] = _NAME,
    queue: Optional[str] = _QUEUE,
    storage_path: str = _STORAGE,
    pvc: str = _PVC,
    node_selector: Optional[list[str]] = _NODE_SELECTOR,
    ttl: int = _TTL,
    backoff_limit: int = _BACKOFF,
    deadline: Optional[int] = _DEADLINE,
    kubeconfig: Optional[str] = _KUBECONFIG,
    context: Optional[str] = _CONTEXT,
    follow: bool = typer.Option(
        True, "--watch/--no-watch", help="Follow the job until it finishes."
    ),
    interval: float = _INTERVAL,
) -> None:
    """Create the RayJob and its job ConfigMap, then report its progress until it finishes."""
    from orchestrator.k8s import client

    objs = _objects(
        config,
        set_,
        gpus_per_worker,
        min_gpus,
        max_gpus,
        image,
        namespace,
        name,
        queue,
        storage_path,
        pvc,
        node_selector,
        ttl,
        backoff_limit,
        deadline,
    )
    api = client.connect(kubeconfig, context)
    created = client.submit(api, objs)
    job_name = created["metadata"]["name"]
    err.print(f"created RayJob {namespace}/{job_name} and ConfigMap {objs[0]['metadata']['name']}")
    if follow:
        _finish(client.watch(api, job_name, namespace, err.print, interval_s=interval))


@app.command()
def status(
    name: str = typer.Argument(..., help="RayJob name."),
    namespace: str = _NAMESPACE,
    kubeconfig: Optional[str] = _KUBECONFIG,
    context: Optional[str] = _CONTEXT,
    follow: bool = typer.Option(
        False, "--watch", "-w", help="Keep reporting changes until the job finishes."
    ),
    interval: float = _INTERVAL,
    json_out: bool = typer.Option(False, "--json", help="Print the snapshot as JSON to stdout."),
) -> None:
    """Say where a RayJob stands: pods waiting for GPUs, workers running, success or failure."""
    from orchestrator.k8s import client
    from orchestrator.k8s.status import snapshot

    api = client.connect(kubeconfig, context)
    if follow:
        snap = client.watch(api, name, namespace, err.print, interval_s=interval)
    else:
        snap = snapshot(*client.observe(api, name, namespace))
        for line in snap.lines:
            err.print(line)
    if json_out:
        print(
            json.dumps(
                {
                    "name": snap.name,
                    "deployment": snap.deployment,
                    "job_status": snap.job_status,
                    "workers_running": snap.workers_running,
                    "gpus_running": snap.gpus_running,
                    "lines": snap.lines,
                },
                indent=2,
            )
        )
    if follow:
        _finish(snap)


@app.command()
def delete(
    name: str = typer.Argument(..., help="RayJob name."),
    namespace: str = _NAMESPACE,
    kubeconfig: Optional[str] = _KUBECONFIG,
    context: Optional[str] = _CONTEXT,
) -> None:
    """Delete a RayJob (its Ray cluster goes with it) and its job ConfigMap."""
    from orchestrator.k8s import client

    for item in client.delete(client.connect(kubeconfig, context), name, namespace):
        err.print(f"deleted {item}")


@app.command()
def validate(
    files: list[Path] = typer.Argument(..., help="Manifest files (multi-document YAML)."),
) -> None:
    """Check manifests offline: KubeRay v1.7.0 CRD schemas (strict) and Kubernetes schemas."""
    from orchestrator.k8s.validate import main

    code = main([str(f) for f in files])
    if code:
        raise typer.Exit(code)


def _finish(snap) -> None:
    if snap.finished and not snap.succeeded:
        raise JobFailedError(snap.facts.get("deployment", f"RayJob {snap.name} failed"))
