"""Render a job config into KubeRay objects: a ConfigMap with the job YAML and a RayJob.

The RayJob carries its own RayCluster spec: a CPU head (it runs the ``mla train`` driver) and one
GPU worker group that the Ray autoscaler (KubeRay in-tree autoscaling) scales between
``minReplicas`` and ``maxReplicas``. The bounds are the world sizes the job can run: multiples of
``tp * pp`` whose data-parallel degree divides the global batch, or the planner's choices for
``parallel: auto`` (see :func:`orchestrator.layouts.runnable_layouts`), restricted to whole pods of ``gpus_per_worker``
GPUs. The entrypoint asks Ray Train for elastic scaling between the smallest and the largest of
them; the runnable sizes themselves travel in the ``mla.io/world-sizes`` annotation.

The job YAML reaches the driver through a ConfigMap mounted read-only at ``/etc/mla`` in the
head pod (a ConfigMap is visible with ``kubectl``, has no size surprises in ``runtimeEnvYAML``
and needs no escaping inside the entrypoint). ``replicas`` is rendered once, equal to
``minReplicas``; after creation the autoscaler owns it and this module never patches it.

This module is pure: no Kubernetes client, no torch.
"""

from __future__ import annotations

import dataclasses
import re
import shlex
from dataclasses import dataclass, field

import yaml

from orchestrator.config import DEFAULT_IMAGE, JobConfig  # noqa: F401 (DEFAULT_IMAGE: re-exported)
from orchestrator.contract.errors import ConfigError, PlanError
from orchestrator.k8s.validate import DNS1035, MAX_RAYJOB_NAME

JOB_CONFIG_DIR = "/etc/mla"
"""Where the head pod mounts the job ConfigMap; the job YAML is ``JOB_CONFIG_DIR/job.yaml``."""
RAY_VERSION = "2.60.0"
"""The Ray version inside the image (KubeRay's ``rayVersion`` describes the image, not the
submitting machine); equal to the ``ray`` pin of the ``[train]`` extra and the Dockerfile's
``RAY_VERSION`` (tests/test_image.py checks both)."""
WORKER_GROUP = "gpu"
"""Name of the GPU worker group (pod label ``ray.io/group``)."""
LABEL_RUN = "mla.io/run"
ANNOTATION_WORLD_SIZES = "mla.io/world-sizes"
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"


@dataclass(frozen=True)
class RenderOptions:
    """How to place a job on a KubeRay cluster.

    Attributes:
        gpus_per_worker: GPUs (``nvidia.com/gpu``) per worker pod; one Ray Train worker per GPU.
        min_gpus: Fewest GPUs the job may run on; unset uses ``cluster.min_workers`` or
            ``cluster.num_workers``.
        max_gpus: Most GPUs the job may use; unset uses ``cluster.num_workers``.
        image: Container image of head and workers; unset uses the job's ``cluster.image``.
        namespace: Kubernetes namespace of the objects.
        name: RayJob name; unset derives ``mla-<run.name>`` (DNS-1035, at most 47 characters).
        queue: Kueue LocalQueue name (``kueue.x-k8s.io/queue-name`` label); unset: no Kueue.
        storage_path: Checkpoint folder (shared by head and workers) or URI (``s3://...``).
        checkpoint_pvc: ReadWriteMany PersistentVolumeClaim mounted at ``storage_path``;
            ignored when ``storage_path`` is a URI.
        node_selector: Node labels the GPU workers must carry (e.g. the GPU product label).
        head_cpu: CPU cores of the head pod (requests = limits).
        head_memory: Memory of the head pod (Kubernetes quantity).
        cpus_per_gpu: CPU cores per GPU in a worker pod.
        memory_per_gpu_gib: Memory per GPU in a worker pod, in GiB.
        shm_per_gpu_gib: ``/dev/shm`` size per GPU (NCCL and dataloaders), in GiB.
        ttl_seconds_after_finished: Seconds the finished cluster is kept for inspection.
        backoff_limit: Retries of a failed job, each on a fresh cluster.
        active_deadline_seconds: Wall-clock limit of the whole RayJob, in seconds; unset: none.
        idle_timeout_seconds: Seconds an idle worker pod is kept before the autoscaler removes it.
    """

    gpus_per_worker: int = 1
    min_gpus: int | None = None
    max_gpus: int | None = None
    image: str | None = None
    namespace: str = "default"
    name: str | None = None
    queue: str | None = None
    storage_path: str = "/mnt/checkpoints"
    checkpoint_pvc: str = "mla-checkpoints"
    node_selector: dict[str, str] = field(default_factory=dict)
    head_cpu: int = 4
    head_memory: str = "16Gi"
    cpus_per_gpu: int = 8
    memory_per_gpu_gib: int = 64
    shm_per_gpu_gib: int = 16
    ttl_seconds_after_finished: int = 600
    backoff_limit: int = 0
    active_deadline_seconds: int | None = None
    idle_timeout_seconds: int = 120


@dataclass(frozen=True)
class WorkerBounds:
    """World sizes a job can run on and the worker-pod replica bounds that follow.

    Example:
        tp=2, pp=1, global_batch=32, micro_batch=4, 2..16 GPUs, 2 GPUs per pod:
        ``sizes=(2, 4, 8, 16)``, ``min_replicas=1``, ``max_replicas=8``.
    """

    sizes: tuple[int, ...]
    gpus_per_worker: int

    @property
    def min_gpus(self) -> int:
        return self.sizes[0]

    @property
    def max_gpus(self) -> int:
        return self.sizes[-1]

    @property
    def min_replicas(self) -> int:
        return self.min_gpus // self.gpus_per_worker

    @property
    def max_replicas(self) -> int:
        return self.max_gpus // self.gpus_per_worker


def worker_bounds(job: JobConfig, opts: RenderOptions) -> WorkerBounds:
    """World sizes in ``[min_gpus, max_gpus]`` the job can run, in whole pods.

    A world size W qualifies when the controller finds a layout for it
    (:func:`orchestrator.layouts.runnable_layouts`: the job's tp and pp dividing W and the
    global batch, or the planner's choice for ``parallel: auto``), W is a multiple of
    ``gpus_per_worker`` and, if
    ``parallel.data`` is pinned, W equals ``data * tp * pp``.

    Raises:
        ConfigError: ``gpus_per_worker < 1`` or ``min_gpus > max_gpus``.
        PlanError: no world size qualifies (the message lists the runnable sizes nearby).
    """
    lo = opts.min_gpus or job.cluster.min_workers or job.cluster.num_workers
    hi = opts.max_gpus or job.cluster.num_workers
    if opts.gpus_per_worker < 1:
        raise ConfigError(f"--gpus-per-worker({opts.gpus_per_worker}) must be >= 1")
    if lo > hi:
        raise ConfigError(
            f"--min-gpus({lo}) > --max-gpus({hi}); make the minimum at most the maximum"
        )
    from orchestrator.layouts import runnable_layouts

    tp, pp = job.parallel.tensor, job.parallel.pipeline
    gb, mb = job.train.global_batch, job.train.micro_batch
    sizes = [
        w
        for w in runnable_layouts(job, range(lo, hi + 1))
        if w % opts.gpus_per_worker == 0
        and (job.parallel.data is None or w == job.parallel.data * tp * pp)
    ]
    if not sizes:
        nearby = list(runnable_layouts(job, range(1, max(4 * hi, 8) + 1)))
        raise PlanError(
            f"no world size in [{lo}, {hi}] GPUs fits tp({tp}) * pp({pp}), global_batch({gb}), "
            f"micro_batch({mb}), gpus_per_worker({opts.gpus_per_worker})"
            + (f" and parallel.data({job.parallel.data})" if job.parallel.data else "")
            + f"; runnable world sizes up to {max(4 * hi, 8)}: {nearby or 'none'}. "
            "Change --min-gpus/--max-gpus, --gpus-per-worker or the batch sizes"
        )
    return WorkerBounds(tuple(sizes), opts.gpus_per_worker)


def rayjob_name(job: JobConfig, opts: RenderOptions) -> str:
    """``opts.name`` or ``mla-<run.name>`` lower-cased, with ``_`` and ``.`` turned into ``-``.

    Raises:
        ConfigError: the result is not a DNS-1035 label of at most 47 characters (KubeRay's
            limit, which leaves room for the RayCluster's 6-character suffix).
    """
    name = opts.name or "mla-" + re.sub(r"[^a-z0-9-]", "-", job.run.name.lower())
    name = name.rstrip("-") if opts.name is None else name
    if len(name) > MAX_RAYJOB_NAME or not DNS1035.match(name):
        raise ConfigError(
            f"RayJob name {name!r} must be a DNS-1035 label (lower-case letters, digits "
            f"and '-', starting with a letter) of at most {MAX_RAYJOB_NAME} characters; "
            "pass --name or shorten run.name"
        )
    return name


def entrypoint(bounds: WorkerBounds, opts: RenderOptions) -> str:
    """The ``mla train`` command the RayJob runs on the head (Ray Train elastic min..max).

    Example:
        ``mla train /etc/mla/job.yaml --set cluster.address=auto --set cluster.use_gpu=true
        --set cluster.num_workers=8 --set cluster.min_workers=2 --set
        cluster.storage_path=/mnt/checkpoints``
    """
    args = [
        "mla",
        "train",
        f"{JOB_CONFIG_DIR}/job.yaml",
        "--set",
        "cluster.address=auto",
        "--set",
        "cluster.use_gpu=true",
        "--set",
        f"cluster.num_workers={bounds.max_gpus}",
        "--set",
        f"cluster.min_workers={bounds.min_gpus}",
        "--set",
        f"cluster.storage_path={opts.storage_path}",
    ]
    return shlex.join(args)


def check_options(opts: RenderOptions) -> None:
    """Refuse names Kubernetes would reject, before anything is rendered.

    Raises:
        ConfigError: naming the option, the value and the rule.
    """
    from orchestrator.k8s.names import (
        dns1123_label_error,
        dns1123_subdomain_error,
        label_key_error,
        label_value_error,
        mount_path_error,
    )

    checks = [("--namespace", dns1123_label_error(opts.namespace))]
    image = opts.image or ""  # render_job has filled it from cluster.image
    if not image.strip() or any(c.isspace() for c in image):
        checks.append(
            (
                "--image",
                f"{opts.image!r} is not a container image reference (e.g. rayproject/ray:2.60.0)",
            )
        )
    if opts.queue is not None:
        checks.append(("--queue", label_value_error(opts.queue)))
    if "://" not in opts.storage_path:
        checks += [
            ("--storage-path", mount_path_error(opts.storage_path)),
            ("--pvc", dns1123_subdomain_error(opts.checkpoint_pvc)),
        ]
    for key, value in opts.node_selector.items():
        checks += [
            ("--node-selector", label_key_error(key)),
            ("--node-selector", label_value_error(value)),
        ]
    for option, problem in checks:
        if problem:
            raise ConfigError(f"{option}: {problem}")


def render_job(job: JobConfig, opts: RenderOptions | None = None) -> list[dict]:
    """The objects ``mla k8s submit`` creates: ``[ConfigMap, RayJob]``.

    Raises:
        ConfigError, PlanError: see :func:`worker_bounds` and :func:`rayjob_name`.
    """
    opts = opts or RenderOptions()
    if opts.image is None:
        opts = dataclasses.replace(opts, image=job.cluster.image)
    check_options(opts)
    bounds = worker_bounds(job, opts)
    name = rayjob_name(job, opts)
    labels = {
        "app.kubernetes.io/name": "mla-train",
        "app.kubernetes.io/managed-by": "mla",
        LABEL_RUN: name.removeprefix("mla-") or name,
    }
    config_map = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": config_map_name(name), "namespace": opts.namespace, "labels": labels},
        "data": {
            "job.yaml": yaml.safe_dump(
                job.model_dump(mode="json", exclude_unset=True), sort_keys=False
            )
        },
    }
    job_labels = {**labels, **({KUEUE_QUEUE_LABEL: opts.queue} if opts.queue else {})}
    spec = {
        "entrypoint": entrypoint(bounds, opts),
        "shutdownAfterJobFinishes": True,
        "ttlSecondsAfterFinished": opts.ttl_seconds_after_finished,
        "backoffLimit": opts.backoff_limit,
        "submissionMode": "K8sJobMode",
        "rayClusterSpec": raycluster_spec(name, bounds, opts),
    }
    if opts.active_deadline_seconds is not None:
        spec["activeDeadlineSeconds"] = opts.active_deadline_seconds
    rayjob = {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": {
            "name": name,
            "namespace": opts.namespace,
            "labels": job_labels,
            "annotations": {ANNOTATION_WORLD_SIZES: ",".join(map(str, bounds.sizes))},
        },
        "spec": spec,
    }
    return [config_map, rayjob]


def config_map_name(rayjob: str) -> str:
    """Name of the ConfigMap holding the job YAML of RayJob ``rayjob``."""
    return f"{rayjob}-job"


def raycluster_spec(name: str, bounds: WorkerBounds, opts: RenderOptions) -> dict:
    """RayCluster spec: CPU head with the job ConfigMap, autoscaled GPU worker group."""
    return {
        "rayVersion": RAY_VERSION,
        "enableInTreeAutoscaling": True,
        "autoscalerOptions": {
            "upscalingMode": "Default",
            "idleTimeoutSeconds": opts.idle_timeout_seconds,
            "resources": _resources(cpu="500m", memory="512Mi"),
        },
        "headGroupSpec": {
            "rayStartParams": {"dashboard-host": "0.0.0.0"},
            "template": {"spec": _head_pod(name, opts)},
        },
        "workerGroupSpecs": [
            {
                "groupName": WORKER_GROUP,
                "replicas": bounds.min_replicas,
                "minReplicas": bounds.min_replicas,
                "maxReplicas": bounds.max_replicas,
                "rayStartParams": {},
                "template": {"spec": _worker_pod(bounds, opts)},
            }
        ],
    }


def _head_pod(name: str, opts: RenderOptions) -> dict:
    mounts = [{"name": "job-config", "mountPath": JOB_CONFIG_DIR, "readOnly": True}] + _ckpt_mounts(
        opts
    )
    container = {
        "name": "ray-head",
        "image": opts.image,
        "ports": [
            {"containerPort": 6379, "name": "gcs-server"},
            {"containerPort": 8265, "name": "dashboard"},
            {"containerPort": 10001, "name": "client"},
            # Ray's autoscaler and dashboard metrics (AUTOSCALER_METRIC_PORT, DASHBOARD_METRIC_PORT):
            # KubeRay adds only `metrics` (8080); k8s/monitoring/podmonitors.yaml scrapes all three
            {"containerPort": 44217, "name": "as-metrics"},
            {"containerPort": 44227, "name": "dash-metrics"},
        ],
        "resources": _resources(cpu=str(opts.head_cpu), memory=opts.head_memory),
        "volumeMounts": mounts,
    }
    volumes = [
        {"name": "job-config", "configMap": {"name": config_map_name(name)}}
    ] + _ckpt_volumes(opts)
    return {"containers": [container], "volumes": volumes}


def _worker_pod(bounds: WorkerBounds, opts: RenderOptions) -> dict:
    g = bounds.gpus_per_worker
    container = {
        "name": "ray-worker",
        "image": opts.image,
        "resources": _resources(
            cpu=str(opts.cpus_per_gpu * g), memory=f"{opts.memory_per_gpu_gib * g}Gi", gpus=g
        ),
        "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}] + _ckpt_mounts(opts),
    }
    pod = {
        "containers": [container],
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "volumes": [
            {
                "name": "dshm",
                "emptyDir": {"medium": "Memory", "sizeLimit": f"{opts.shm_per_gpu_gib * g}Gi"},
            }
        ]
        + _ckpt_volumes(opts),
    }
    if opts.node_selector:
        pod["nodeSelector"] = dict(opts.node_selector)
    return pod


def _resources(cpu: str, memory: str, gpus: int = 0) -> dict:
    amounts = {"cpu": cpu, "memory": memory, **({"nvidia.com/gpu": str(gpus)} if gpus else {})}
    return {"requests": dict(amounts), "limits": dict(amounts)}


def _ckpt_mounts(opts: RenderOptions) -> list[dict]:
    return (
        []
        if "://" in opts.storage_path
        else [{"name": "checkpoints", "mountPath": opts.storage_path}]
    )


def _ckpt_volumes(opts: RenderOptions) -> list[dict]:
    if "://" in opts.storage_path:
        return []
    return [{"name": "checkpoints", "persistentVolumeClaim": {"claimName": opts.checkpoint_pvc}}]


class _Dumper(yaml.SafeDumper):
    """Safe dumper writing multi-line strings (the job YAML) as literal ``|`` blocks."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def to_yaml(objs: list[dict]) -> str:
    """Multi-document YAML (``---`` separated), keys in insertion order."""
    return "---\n".join(yaml.dump(o, Dumper=_Dumper, sort_keys=False, width=100) for o in objs)
