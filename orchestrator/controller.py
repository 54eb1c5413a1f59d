"""The Ray controller: turns a validated job into a plan and runs it with Ray Train.

``run_training(job)``:
1. validates the data on the driver, before any worker starts;
2. plans a layout for every world size the job may run on (``cluster.min_workers`` ..
   ``cluster.num_workers`` for elastic runs) and generates each DeepSpeed config;
3. starts an embedded local Ray (or connects to ``cluster.address``);
4. runs ``TorchTrainer`` (gloo on CPU, nccl on GPU) with ``FailureConfig`` retries, streaming
   one progress line per logged step from ``RUN_DIR/metrics.jsonl`` to stderr;
5. writes ``RUN_DIR/summary.json`` atomically.

Ray and torch are imported inside functions, so importing this module stays cheap.
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from orchestrator.config import JobConfig
from orchestrator.deepspeed_config import build_deepspeed_config
from orchestrator.errors import ClusterError, ConfigError, JobFailedError, PlanError
from workers.checkpoint import latest_checkpoint, write_json_atomic
from workers.data import check_corpus, load_corpus
from workers.layout import Layout, LayoutError

console = Console(stderr=True, highlight=False, markup=False)


def check_data(job: JobConfig) -> str:
    """Load and check the corpus on the driver; returns a one-line description.

    Raises:
        DataError: missing path, empty corpus, malformed records, or a split shorter than one
            sequence. Nothing has been started yet when it is raised.
        ConfigError: the model's vocabulary cannot hold the byte-level tokenizer's 256 ids.
    """
    model = job.model_config_()
    if job.data.tokenizer == "byte" and model.vocab_size < 256:
        raise ConfigError(f"model.vocab_size={model.vocab_size} is smaller than the byte tokenizer's 256 ids; "
                          "set model.vocab_size to at least 256")
    corpus = load_corpus(job.data.path, job.data.val_fraction)
    check_corpus(corpus, job.data.seq_len)
    return f"{corpus.source}: {corpus.n_docs} documents, {len(corpus.train):,} train / {len(corpus.val):,} val tokens"


def layout_for_world(job: JobConfig, world_size: int) -> Layout:
    """The layout for ``world_size`` workers under the job's ``parallel`` section.

    With ``parallel.auto`` the planner chooses (CPU catalogue entry for local runs, the GPU in
    ``cluster`` otherwise); with pinned degrees ``dp = world_size / (tp * pp)`` and gradient
    accumulation makes up the global batch: ``grad_accum = global_batch / (dp * micro_batch)``.

    Raises:
        PlanError: the degrees do not divide the world size, the batch, or the model.
    """
    if job.parallel.auto:
        return _runnable(_auto_layout(job, world_size), "the planner's choice for "
                         f"{world_size} workers (parallel.auto)")
    p, t, model = job.parallel, job.train, job.model_config_()
    unit = p.tensor * p.pipeline
    if world_size % unit:
        raise PlanError(f"parallel.tensor({p.tensor}) * parallel.pipeline({p.pipeline}) = {unit} does not divide "
                        f"{world_size} workers; use a worker count that is a multiple of {unit}")
    dp = world_size // unit
    if p.data is not None and p.data != dp and world_size == job.cluster.num_workers:
        raise PlanError(f"parallel.data({p.data}) * tensor({p.tensor}) * pipeline({p.pipeline}) = "
                        f"{p.data * unit} != cluster.num_workers({world_size}); fix one of them or unset parallel.data")
    if t.global_batch % (dp * t.micro_batch):
        raise PlanError(f"train.global_batch({t.global_batch}) is not divisible by data-parallel degree ({dp}) * "
                        f"train.micro_batch({t.micro_batch}); choose a global batch that is a multiple of "
                        f"{dp * t.micro_batch}")
    try:
        layout = Layout(dp=dp, tp=p.tensor, pp=p.pipeline, zero_stage=p.zero_stage, micro_batch=t.micro_batch,
                        grad_accum=t.global_batch // (dp * t.micro_batch), recompute=p.recompute,
                        sequence_parallel=p.sequence_parallel, virtual_stages=p.virtual_stages)
        layout.check_model(model.n_heads, model.kv_heads, model.n_layers)
    except LayoutError as exc:
        raise PlanError(f"parallel: {exc}") from None
    return _runnable(layout, "parallel")


def _runnable(layout: Layout, where: str) -> Layout:
    """``layout`` if the DeepSpeed workers can run it, else :class:`PlanError` with the reason."""
    from workers.parallel.support import unsupported_reason

    reason = unsupported_reason(layout)
    if reason is not None:
        raise PlanError(f"{where}: {reason}")
    return layout


def _auto_layout(job: JobConfig, world_size: int) -> Layout:
    from orchestrator.planner import plan_job

    result = plan_job(job, world_size=world_size, gpu=job.cluster.gpu if job.cluster.use_gpu else "cpu")
    layout = result.best.layout
    if layout.world_size != world_size:
        raise PlanError(f"parallel.auto: {'; '.join(result.notes)}; set cluster.num_workers={layout.world_size}")
    return layout


def check_resumable(job: JobConfig, plans: dict) -> None:
    """Refuse, before launch, a resume the workers cannot do.

    Checkpoints of ZeRO 0-2 runs are layout-independent (any plan may load them); ZeRO-3 runs
    keep DeepSpeed's own format, which loads under the layout that wrote it only.

    Raises:
        PlanError: the latest checkpoint and a planned layout differ while either uses ZeRO-3.
    """
    found = latest_checkpoint(job.run_dir.resolve()) if job.checkpoint.resume else None
    if found is None:
        return
    saved = json.loads((found[1] / "meta.json").read_text()).get("layout")
    for w, entry in plans.items():
        if saved and entry["layout"] != saved and 3 in (saved.get("zero_stage"), entry["layout"]["zero_stage"]):
            raise PlanError(f"checkpoint {found[1]} was written under {Layout(**saved).describe()} and the plan for "
                            f"{w} workers is {Layout(**entry['layout']).describe()}; ZeRO-3 checkpoints load under "
                            "the same layout only: resume with the same workers and parallel settings, use "
                            "parallel.zero_stage<=2, or start a new run name")


def runnable_layouts(job: JobConfig, lo: int, hi: int) -> dict[int, Layout]:
    """World size -> layout for every size in ``[lo, hi]`` for which :func:`layout_for_world`
    finds one (pinned degrees that divide the size and the batch, or the planner's choice for
    ``parallel: auto``)."""
    layouts = {}
    for w in range(max(1, lo), hi + 1):
        try:
            layouts[w] = layout_for_world(job, w)
        except PlanError:
            continue
    return layouts


def runnable_sizes(job: JobConfig, lo: int, hi: int) -> list[int]:
    """The world sizes of :func:`runnable_layouts`, ascending."""
    return list(runnable_layouts(job, lo, hi))


def _job_layouts(job: JobConfig) -> dict[int, Layout]:
    """Layouts for ``num_workers``, or for each runnable size of the elastic range.

    Raises:
        PlanError: ``cluster.num_workers`` itself has no layout (the message says why).
    """
    hi = job.cluster.num_workers
    layouts = runnable_layouts(job, job.cluster.min_workers or hi, hi)
    if hi not in layouts:
        layout_for_world(job, hi)  # raises with the reason
    return layouts


def world_sizes(job: JobConfig) -> list[int]:
    """World sizes the job may run on: ``num_workers``, or the elastic range's runnable sizes.

    Raises:
        PlanError: ``cluster.num_workers`` itself has no layout (the message says why).
    """
    return list(_job_layouts(job))


def build_worker_plans(job: JobConfig) -> dict[str, dict]:
    """World size (str) -> ``{"layout": ..., "deepspeed": ...}`` for every runnable size."""
    return {str(w): {"layout": layout.to_dict(), "deepspeed": build_deepspeed_config(job, layout)}
            for w, layout in _job_layouts(job).items()}


@dataclass
class RayHandle:
    """A Ray connection; ``started`` tells whether we own (and must stop) it."""

    started: bool

    def shutdown(self) -> None:
        import ray

        if ray.is_initialized():
            ray.shutdown()


def connect_ray(job: JobConfig, num_cpus: int | None = None, dashboard: bool = False) -> RayHandle:
    """Start an embedded local Ray, or connect to ``cluster.address``.

    The embedded Ray gets ``cluster.ray_num_cpus`` CPUs, else ``num_cpus``, else what the
    workers reserve (``num_workers * cpus_per_worker``), and listens on 127.0.0.1 only.
    ``dashboard`` starts Ray's dashboard (on 127.0.0.1) for its state API, which Ray Train's
    placement-group cleaner needs when Tune stops a trial's driver.

    Raises:
        ClusterError: the address cannot be reached (says what was tried and how to start one).
    """
    if not job.cluster.address:
        # Must be set before Ray is first imported: with it, Ray's node-IP lookup returns
        # 127.0.0.1 instead of the machine's external address (ray_constants.ENABLE_RAY_CLUSTER).
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    if ray.is_initialized():
        return RayHandle(started=False)
    verbose = bool(os.environ.get("MLA_VERBOSE"))
    if job.cluster.address:
        _connect_address(job, verbose)
        return RayHandle(started=False)
    c = job.cluster
    num_cpus = c.ray_num_cpus or num_cpus or max(1, int(round(c.num_workers * c.cpus_per_worker)))
    # Fix the GCS port and publish it as RAY_ADDRESS, which Ray's processes inherit: Ray's own
    # helpers that look the cluster up (the state API used by Ray Train's placement-group
    # cleaner) would otherwise find the last `ray start` cluster of this machine, or none.
    port = _free_port()
    os.environ["RAY_GCS_SERVER_PORT"] = str(port)
    os.environ["RAY_ADDRESS"] = f"127.0.0.1:{port}"
    # address="local" always starts a new cluster, even if `ray start` runs on this machine.
    ray.init(address="local", num_cpus=num_cpus, num_gpus=None if c.use_gpu else 0,
             object_store_memory=c.object_store_mb * 1024 * 1024, include_dashboard=dashboard,
             dashboard_host="127.0.0.1", log_to_driver=verbose, logging_level="WARNING",
             _node_ip_address="127.0.0.1", configure_logging=True)
    return RayHandle(started=True)


def _connect_address(job: JobConfig, verbose: bool) -> None:
    """``ray.init(cluster.address)`` with the job's runtime env: the project code as the
    ``working_dir`` merged with ``cluster.runtime_env``. Inside a Ray job (``mla submit``) the
    job's own runtime env already carries both, and Ray would refuse a second one.

    Raises:
        ClusterError: the address cannot be reached.
    """
    import tempfile

    import ray

    from orchestrator.jobs import stage_code
    from orchestrator.runtime_env import build_runtime_env

    with tempfile.TemporaryDirectory(prefix="mla-code-") as tmp:
        runtime_env = None
        if not os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"):
            stage_code(Path(tmp))
            runtime_env = build_runtime_env(job.cluster, working_dir=tmp)
        try:  # ray.init uploads the working_dir before it returns
            ray.init(address=job.cluster.address, runtime_env=runtime_env, log_to_driver=verbose,
                     logging_level="WARNING")
        except Exception as exc:  # Ray raises ConnectionError, RuntimeError, ...
            raise ClusterError(f"cannot connect to the Ray cluster at cluster.address={job.cluster.address!r} "
                               f"({exc}); start one with `ray start --head` or unset cluster.address to use "
                               "an embedded local Ray") from None


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ProgressTail(threading.Thread):
    """Print new ``metrics.jsonl`` records as progress lines while training runs."""

    def __init__(self, path: Path, total_steps: int, layout_text: str):
        super().__init__(daemon=True)
        self.path, self.total_steps, self.layout_text = path, total_steps, layout_text
        self.offset = path.stat().st_size if path.exists() else 0
        self.stop_event = threading.Event()
        self.started_at = time.time()

    def run(self) -> None:
        while not self.stop_event.wait(0.5):
            self.poll()
        self.poll()

    def poll(self) -> None:
        if not self.path.exists():
            return
        with open(self.path) as fh:
            if self.path.stat().st_size < self.offset:  # trimmed on resume
                self.offset = 0
            fh.seek(self.offset)
            chunk = fh.read()
        complete = chunk[: chunk.rfind("\n") + 1]
        self.offset += len(complete.encode())
        for line in complete.splitlines():
            if line.strip():
                console.print(format_progress(json.loads(line), self.total_steps, time.time() - self.started_at))


def format_progress(record: dict, total_steps: int, elapsed_s: float) -> str:
    """One progress line: ``step 40/200  loss 2.3141  val 2.2810  tok/s 5,210  lr 2.9e-03  12s``."""
    parts = [f"step {record['step']:>5}/{total_steps}"]
    if "loss" in record:
        parts.append(f"loss {record['loss']:.4f}")
    if "val_loss" in record:
        parts.append(f"val {record['val_loss']:.4f}")
    if "tokens_per_s" in record:
        parts.append(f"tok/s {record['tokens_per_s']:,.0f}")
    if "lr" in record:
        parts.append(f"lr {record['lr']:.2e}")
    parts.append(f"{elapsed_s:,.0f}s")
    return "  ".join(parts)


def run_training(job: JobConfig, preflight: bool = True) -> dict:
    """Run the job to completion and return the summary (also written to ``RUN_DIR/summary.json``).

    With ``cluster.address`` set and ``preflight``, every node's Python (and the job's paths) is
    checked before the workers start (:func:`orchestrator.preflight.preflight_connected`).

    Raises:
        DataError, ConfigError, PlanError: before anything starts.
        ClusterError: Ray cannot be reached, or a node fails the preflight.
        JobFailedError: the workers failed more often than ``cluster.max_failures`` allows.
    """
    data_text = check_data(job)
    plans = build_worker_plans(job)
    check_resumable(job, plans)
    run_dir = job.run_dir.resolve()
    main_layout = Layout(**plans[str(max(int(w) for w in plans))]["layout"])
    load_torch_before_ray()
    handle = connect_ray(job)
    if preflight and job.cluster.address:
        check_cluster(job, handle)
    run_dir.mkdir(parents=True, exist_ok=True)
    _print_header(job, data_text, main_layout, plans, run_dir)
    write_json_atomic(run_dir / "job.json", job.model_dump(mode="json"))
    tail = ProgressTail(run_dir / "metrics.jsonl", job.train.steps, main_layout.describe())
    started = time.time()
    try:
        tail.start()
        result = _fit(job, plans, run_dir)
    finally:
        tail.stop_event.set()
        tail.join(timeout=5)
        if handle.started:
            handle.shutdown()
    if result.error is not None:
        raise JobFailedError(f"training failed: {_root_cause(result.error)} (run folder: {run_dir})")
    summary = build_summary(job, run_dir, time.time() - started)
    write_json_atomic(run_dir / "summary.json", summary)
    console.print(f"done: {summary['steps']} steps, val_loss {summary['first_val_loss']} -> "
                  f"{summary['last_val_loss']}, {summary['tokens_per_s']:,.0f} tokens/s; summary: "
                  f"{run_dir / 'summary.json'}")
    return summary


def check_cluster(job: JobConfig, handle: RayHandle) -> None:
    """Preflight of a connected driver; disconnects (when ours) and re-raises on failure.

    Raises:
        ClusterError: see :func:`orchestrator.preflight.check_result`.
    """
    from orchestrator.preflight import preflight_connected

    try:
        preflight_connected(job, check_storage=job.cluster.storage_path is not None)
    except ClusterError:
        handle.shutdown()
        raise


def build_trainer(job: JobConfig, plans: dict, run_dir: Path, callbacks: list | tuple = ()):
    """The ``TorchTrainer`` for ``job``: one worker per process of the plan (an elastic
    ``(min, max)`` range when ``cluster.min_workers`` is set), gloo on CPU / nccl on GPU,
    ``FailureConfig`` retries, and the run folder as Ray Train's storage (``RUN_DIR``)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from workers.entry import train_loop_per_worker

    c = job.cluster
    sizes = sorted(int(w) for w in plans)
    num_workers = (sizes[0], sizes[-1]) if len(sizes) > 1 else sizes[0]
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"job": job.model_dump(mode="json"), "model": job.model_config_().to_dict(),
                           "run_dir": str(run_dir), "plans": plans},
        torch_config=TorchConfig(backend="nccl" if c.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=c.use_gpu,
                                     resources_per_worker={"CPU": c.cpus_per_worker}),
        run_config=RunConfig(name=run_dir.name, storage_path=str(run_dir.parent),
                             failure_config=FailureConfig(max_failures=c.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=job.checkpoint.keep),
                             callbacks=list(callbacks)),
    )


def load_torch_before_ray() -> None:
    """Import torch before Ray connects: Ray Train's torch integration loads it in the driver
    anyway, and loaded after ``ray.init(address="auto")`` inside a Ray job's driver process its
    bundled oneMKL fails with "Intel oneMKL FATAL ERROR: Cannot load libtorch_cpu.so" (seen with
    Ray 2.60 / torch 2.13 CPU)."""
    import torch  # noqa: F401


def _fit(job: JobConfig, plans: dict, run_dir: Path):
    try:
        return build_trainer(job, plans, run_dir).fit()
    except Exception as exc:  # Train V2 raises TrainingFailedError from fit()
        return _FailedResult(exc)


@dataclass
class _FailedResult:
    error: BaseException


def _root_cause(exc: BaseException) -> str:
    while exc.__cause__ is not None:
        exc = exc.__cause__
    text = str(exc).strip().splitlines()
    return text[-1] if text else type(exc).__name__


def build_summary(job: JobConfig, run_dir: Path, wall_time_s: float) -> dict:
    """Summarise ``metrics.jsonl`` and ``events.jsonl`` of a finished run."""
    records = _read_jsonl(run_dir / "metrics.jsonl")
    events = [e for e in _read_jsonl(run_dir / "events.jsonl") if e.get("event") == "start"]
    vals = [r for r in records if "val_loss" in r]
    speeds = [r["tokens_per_s"] for r in records if "tokens_per_s" in r]
    resumes = [e for e in events if e.get("resumed_from_step") is not None]
    found = latest_checkpoint(run_dir)
    last_event = events[-1] if events else {}
    return {
        "run": job.run.name,
        "steps": max((r["step"] for r in records), default=0),
        "first_val_loss": vals[0]["val_loss"] if vals else None,
        "last_val_loss": vals[-1]["val_loss"] if vals else None,
        "val_loss": [{"step": r["step"], "val_loss": r["val_loss"]} for r in vals],
        "tokens_per_s": sum(speeds) / len(speeds) if speeds else 0.0,
        "wall_time_s": round(wall_time_s, 2),
        "layout": last_event.get("layout"),
        "world_size": last_event.get("world_size"),
        "attempts": len(events),
        "resumed_from_step": resumes[-1]["resumed_from_step"] if resumes else None,
        "resumes": [{"step": e["resumed_from_step"], "world_size": e["world_size"]} for e in resumes],
        "checkpoint": str(found[1]) if found else None,
    }


def _read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _print_header(job: JobConfig, data_text: str, layout: Layout, plans: dict, run_dir: Path) -> None:
    from mla.flops import count_parameters

    model = job.model_config_()
    sizes = ", ".join(sorted(plans, key=int))
    console.print(f"mla train {job.run.name}: {count_parameters(model):,} parameters, "
                  f"attention={model.attention} (window {model.local_window}, top-k {model.global_k})")
    console.print(f"data: {data_text}")
    console.print(f"layout: {layout.describe()}  (world sizes: {sizes}); run folder: {run_dir}")
