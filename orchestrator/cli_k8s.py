"""``mla k8s``: render, submit, status, delete and validate KubeRay RayJobs.

Manifests go to stdout (or ``--output``); progress in plain words goes to stderr.
"""

from __future__ import annotations

import functools
import inspect
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import typer

from orchestrator.cli_common import SetOption, err
from orchestrator.contract.errors import ConfigError, JobFailedError

app = typer.Typer(
    name="k8s", help="KubeRay manifests: render, submit, status, delete.", no_args_is_help=True
)

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


#: The job and its rendering options, shared by ``render`` and ``submit``: typer parameters
#: that :func:`_render_options` puts in front of each command's own.
_RENDER_PARAMS = [
    inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=kind)
    for name, kind, default in (
        ("config", str, _CONFIG),
        ("set_", Optional[list[str]], SetOption),
        ("gpus_per_worker", int, _GPUS_PER_WORKER),
        ("min_gpus", Optional[int], _MIN_GPUS),
        ("max_gpus", Optional[int], _MAX_GPUS),
        ("image", Optional[str], _IMAGE),
        ("namespace", str, _NAMESPACE),
        ("name", Optional[str], _NAME),
        ("queue", Optional[str], _QUEUE),
        ("storage_path", str, _STORAGE),
        ("pvc", str, _PVC),
        ("node_selector", Optional[list[str]], _NODE_SELECTOR),
        ("ttl", int, _TTL),
        ("backoff_limit", int, _BACKOFF),
        ("deadline", Optional[int], _DEADLINE),
    )
]


def _render_options(command: Callable[..., None]) -> Callable[..., None]:
    """Give ``command`` the job and render options; it receives the rendered objects instead.

    The options are declared once (:data:`_RENDER_PARAMS`, the option-group pattern of
    SkyPilot's ``_add_click_options``); the wrapped command takes ``objects`` (the ConfigMap and
    RayJob dicts of :func:`orchestrator.k8s.render.render_job`) and ``namespace``, plus its own
    parameters.
    """
    own = [p for p in inspect.signature(command).parameters.values() if p.name != "objects"]
    own = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own if p.name != "namespace"]
    names = [p.name for p in _RENDER_PARAMS]

    @functools.wraps(command)
    def wrapper(**kwargs: Any) -> None:
        options = {name: kwargs.pop(name) for name in names}
        command(objects=_objects(**options), namespace=options["namespace"], **kwargs)

    wrapper.__signature__ = inspect.Signature([*_RENDER_PARAMS, *own])  # type: ignore[attr-defined]
    return wrapper


def _objects(
    *,
    config: str,
    set_: Optional[list[str]],
    pvc: str,
    node_selector,
    ttl: int,
    backoff_limit: int,
    deadline: Optional[int],
    **fields: Any,
) -> list[dict]:
    """ConfigMap and RayJob dicts of the job ``config`` (with ``--set``) and the CLI options."""
    from orchestrator.config import load_job_config
    from orchestrator.k8s.render import RenderOptions, render_job

    job = load_job_config(config, set_ or [])
    opts = RenderOptions(
        **fields,
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
@_render_options
def render(
    objects: list[dict],
    namespace: str,
    output: Optional[Path] = typer.Option(
        None, "--output", "-o", help="Write the YAML here instead of stdout."
    ),
) -> None:
    """Render the ConfigMap and RayJob (with its autoscaled RayCluster) for a job config."""
    from orchestrator.k8s.render import to_yaml

    text = to_yaml(objects)
    if output:
        _write_atomic(output, text)
        err.print(f"wrote {output}")
    else:
        sys.stdout.write(text)


def _write_atomic(path: Path, text: str) -> None:
    """Write ``text`` atomically (:func:`orchestrator.contract.io.atomic_write`: no half-written
    manifest).

    Raises:
        ConfigError: the folder does not exist or is not writable (names --output).
    """
    from orchestrator.contract.io import atomic_write

    try:
        atomic_write(path, text)
    except OSError as exc:
        raise ConfigError(
            f"--output {str(path)!r}: cannot write it ({exc.strerror}); pass a path in an existing, "
            "writable folder"
        ) from None


@app.command()
@_render_options
def submit(
    objects: list[dict],
    namespace: str,
    kubeconfig: Optional[str] = _KUBECONFIG,
    context: Optional[str] = _CONTEXT,
    follow: bool = typer.Option(
        True, "--watch/--no-watch", help="Follow the job until it finishes."
    ),
    interval: float = _INTERVAL,
) -> None:
    """Create the RayJob and its job ConfigMap, then report its progress until it finishes."""
    from orchestrator.k8s import client

    api = client.connect(kubeconfig, context)
    created = client.submit(api, objects)
    job_name = created["metadata"]["name"]
    err.print(
        f"created RayJob {namespace}/{job_name} and ConfigMap {objects[0]['metadata']['name']}"
    )
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
