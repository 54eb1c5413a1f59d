"""The Ray launcher: connect to Ray, build the ``TorchTrainer``, run a planned job.

``run_training(job)``:
1. validates the data on the driver, before any worker starts;
2. builds the :class:`~orchestrator.contract.run_plan.RunPlan` (:mod:`orchestrator.layouts`: a
   layout and DeepSpeed config for every world size the job may run on) and refuses a resume
   the workers cannot do; under ``train.privacy`` adds the DP-SGD plan
   (:mod:`orchestrator.privacy`), refused when over budget or for a layout DP-SGD cannot run;
3. starts an embedded local Ray (or connects to ``cluster.address``);
4. runs ``TorchTrainer`` (gloo on CPU, nccl on GPU) with ``FailureConfig`` retries, streaming
   one progress line per logged step (:mod:`orchestrator.progress`);
5. writes ``RUN_DIR/summary.json`` atomically.

Ray and torch are imported inside functions, so importing this module stays cheap.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from orchestrator.config import JobConfig
from orchestrator.contract.checkpoints import FAILURE_FILE
from orchestrator.contract.errors import ClusterError, ConfigError, JobFailedError, MLAError
from orchestrator.contract.io import write_json_atomic
from orchestrator.contract.run_plan import RunPlan
from orchestrator.distill import attach_distill
from orchestrator.finetune import attach_finetune
from orchestrator.layouts import build_run_plan, check_resumable
from orchestrator.privacy import attach_privacy
from orchestrator.progress import ProgressTail, build_summary, console, print_header
from workers.data import check_corpus, load_corpus
from workers.tokenizer_spec import ensure_run_tokenizer, job_tokenizer


def check_data(job: JobConfig) -> str:
    """Load and check the corpus on the driver; returns a one-line description.

    With ``data.tokenizer=bpe`` the BPE is trained here, on the training split, into
    ``RUN_DIR/tokenizer.json`` (once: a resumed run keeps it).

    Raises:
        DataError: missing path, empty corpus, malformed records, or a split shorter than one
            sequence. Nothing has been started yet when it is raised.
        ConfigError: the model's vocabulary cannot hold the tokenizer's ids, or a bad
            tokenizer.
    """
    model = job.model_config_()
    if job.data.tokenizer == "byte" and model.vocab_size < 256:
        raise ConfigError(
            f"model.vocab_size={model.vocab_size} is smaller than the byte tokenizer's 256 ids; "
            "set model.vocab_size to at least 256"
        )
    if ensure_run_tokenizer(job) is not None:
        model = job.model_config_()  # the trained file may hold fewer ids than asked
    tokenizer = job_tokenizer(job)
    corpus = load_corpus(job.data.path, job.data.val_fraction, tokenizer)
    check_corpus(corpus, job.data.seq_len)
    warn_small_corpus(len(corpus.train), len(corpus.val), job.data.seq_len, job.train.global_batch)
    return (
        f"{corpus.source}: {corpus.n_docs} documents, {len(corpus.train):,} train / "
        f"{len(corpus.val):,} val tokens ({tokenizer.kind} tokenizer, {tokenizer.vocab_size} ids)"
    )


def warn_small_corpus(
    train_tokens: int, val_tokens: int, seq_len: int, global_batch: int
) -> list[str]:
    """Warn (on the console; returned too) when a split holds fewer ``seq_len`` windows than one
    global batch: every step then repeats windows within the batch."""
    warnings = []
    for split, n in (("train", train_tokens), ("validation", val_tokens)):
        windows = max(0, (n - 1) // seq_len)
        if windows < global_batch:
            warnings.append(
                f"warning: the {split} split holds {windows} windows of data.seq_len={seq_len} tokens, "
                f"fewer than one global batch (train.global_batch={global_batch}): each batch repeats "
                "windows; add text or lower data.seq_len / train.global_batch"
            )
    for text in warnings:
        console.print(text)
    return warnings


def make_run_dir(job: JobConfig, run_dir) -> None:
    """Create RUN_DIR and check that it is writable.

    Raises:
        ConfigError: it cannot be created or written (names run.dir / cluster.storage_path).
    """
    name = "cluster.storage_path" if job.cluster.storage_path else "run.dir"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(
            f"{name}: cannot create or write the run folder {run_dir} ({exc.strerror}); choose a "
            f"writable folder, e.g. --set {name}=runs"
        ) from None


def _read_failure(run_dir) -> dict | None:
    """The divergence record the workers wrote (``RUN_DIR/failure.json``), if any."""
    import json

    try:
        return json.loads((run_dir / FAILURE_FILE).read_text())
    except (OSError, ValueError):
        return None


@dataclass
class RayHandle:
    """A Ray connection; ``started`` tells whether we own (and must stop) it.

    ``saved_env`` holds the values the connection replaced in ``os.environ``; :meth:`close`
    puts them back, so no environment change outlives the connection.
    """

    started: bool
    saved_env: dict[str, str | None] = field(default_factory=dict)

    def shutdown(self) -> None:
        import ray

        if ray.is_initialized():
            ray.shutdown()

    def close(self) -> None:
        """Stop the Ray we started (if any) and restore the environment."""
        try:
            if self.started:
                self.shutdown()
        finally:
            _restore_env(self.saved_env)


def connect_ray(job: JobConfig, num_cpus: int | None = None, dashboard: bool = False) -> RayHandle:
    """Start an embedded local Ray, or connect to ``cluster.address``; ``close()`` the handle.

    The embedded Ray gets ``cluster.ray_num_cpus`` CPUs, else ``num_cpus``, else what the
    workers reserve (``num_workers * cpus_per_worker``), and listens on 127.0.0.1 only.
    ``dashboard`` starts Ray's dashboard (on 127.0.0.1) for its state API, which Ray Train's
    placement-group cleaner needs when Tune stops a trial's driver.

    Raises:
        ClusterError: the address cannot be reached, or the local cluster does not start (a
            startup timeout under load, an unusable temp folder); says what was tried and how
            to start one.
    """
    saved: dict[str, str | None] = {}
    try:
        return _connect(job, num_cpus, dashboard, saved)
    except BaseException:
        _restore_env(saved)
        raise


@contextmanager
def ray_session(
    job: JobConfig, num_cpus: int | None = None, dashboard: bool = False
) -> Iterator[RayHandle]:
    """:func:`connect_ray` as a context manager: the handle is closed on exit."""
    handle = connect_ray(job, num_cpus, dashboard)
    try:
        yield handle
    finally:
        handle.close()


def _connect(
    job: JobConfig, num_cpus: int | None, dashboard: bool, saved: dict[str, str | None]
) -> RayHandle:
    if not job.cluster.address and "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER" not in os.environ:
        # Must be set before Ray is first imported: with it, Ray's node-IP lookup returns
        # 127.0.0.1 instead of the machine's external address (ray_constants.ENABLE_RAY_CLUSTER).
        _set_env(saved, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    if ray.is_initialized():
        return RayHandle(started=False, saved_env=saved)
    verbose = bool(os.environ.get("MLA_VERBOSE"))
    if job.cluster.address:
        _connect_address(job, verbose)
        return RayHandle(started=False, saved_env=saved)
    cluster = job.cluster
    num_cpus = (
        cluster.ray_num_cpus
        or num_cpus
        or max(1, int(round(cluster.num_workers * cluster.cpus_per_worker)))
    )
    # Fix the GCS port and publish it as RAY_ADDRESS while the connection lasts (Ray's processes
    # inherit it): Ray's own helpers that look the cluster up (the state API used by Ray Train's
    # placement-group cleaner) would otherwise find the last `ray start` cluster of this
    # machine, or none.
    port = free_port()
    _set_env(saved, "RAY_GCS_SERVER_PORT", str(port))
    _set_env(saved, "RAY_ADDRESS", f"127.0.0.1:{port}")
    try:  # address="local" always starts a new cluster, even if `ray start` runs here
        ray.init(
            address="local",
            num_cpus=num_cpus,
            num_gpus=None if cluster.use_gpu else 0,
            object_store_memory=cluster.object_store_mb * 1024 * 1024,
            include_dashboard=dashboard,
            dashboard_host="127.0.0.1",
            log_to_driver=verbose,
            logging_level=logging.WARNING,
            _node_ip_address="127.0.0.1",
            _metrics_export_port=cluster.metrics_port,
            configure_logging=True,
        )
    except Exception as exc:  # Ray raises Exception, TimeoutError, RuntimeError, ValueError
        ray.shutdown()  # stop the processes a half-started node left behind
        raise ClusterError(_local_start_failure(exc, num_cpus, cluster.object_store_mb)) from None
    return RayHandle(started=True, saved_env=saved)


def _local_start_failure(exc: BaseException, num_cpus: int, object_store_mb: int) -> str:
    """The message of a local Ray cluster that did not start (a timeout under load, mostly)."""
    return (
        f"could not start a local Ray cluster (num_cpus={num_cpus}, "
        f"cluster.object_store_mb={object_store_mb}): {_root_cause(exc)}. A startup timeout "
        "means the machine was too loaded for Ray's 30 s limit: retry when it is less busy, "
        "lower cluster.ray_num_cpus or cluster.object_store_mb, or start Ray once with `ray "
        "start --head --num-cpus N` and set cluster.address=auto"
    )


def metrics_endpoint(handle: RayHandle) -> str | None:
    """``http://127.0.0.1:PORT/metrics`` of the embedded Ray we started (Prometheus text of the
    workers' ``ray_mla_*`` metrics and Ray's own), ``None`` for a cluster we connected to."""
    if not handle.started:
        return None
    import ray

    node = ray._private.worker.global_worker.node
    return f"http://127.0.0.1:{node.metrics_export_port}/metrics"


def _connect_address(job: JobConfig, verbose: bool) -> None:
    """``ray.init(cluster.address)`` with the job's runtime env: the project code as the
    ``working_dir`` merged with ``cluster.runtime_env``. Inside a Ray job (``mla submit``) the
    job's own runtime env already carries both, and Ray would refuse a second one.

    Raises:
        ClusterError: the address cannot be reached.
    """
    import tempfile
    from pathlib import Path

    import ray

    from orchestrator.jobs import stage_code
    from orchestrator.runtime_env import build_runtime_env

    with tempfile.TemporaryDirectory(prefix="mla-code-") as tmp:
        runtime_env = None
        if not os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"):
            stage_code(Path(tmp))
            runtime_env = build_runtime_env(job.cluster, working_dir=tmp)
        try:  # ray.init uploads the working_dir before it returns
            ray.init(
                address=job.cluster.address,
                runtime_env=runtime_env,
                log_to_driver=verbose,
                logging_level=logging.WARNING,
            )
        except Exception as exc:  # Ray raises ConnectionError, RuntimeError, ...
            raise ClusterError(
                f"cannot connect to the Ray cluster at cluster.address={job.cluster.address!r} "
                f"({exc}); start one with `ray start --head` or unset cluster.address to use "
                "an embedded local Ray"
            ) from None


def check_cluster(job: JobConfig, handle: RayHandle) -> None:
    """Preflight of a connected driver; closes the handle and re-raises on failure.

    Raises:
        ClusterError: see :func:`orchestrator.preflight.check_result`.
    """
    from orchestrator.preflight import preflight_connected

    try:
        preflight_connected(job, check_storage=job.cluster.storage_path is not None)
    except ClusterError:
        handle.shutdown()
        handle.close()
        raise


def _set_env(saved: dict[str, str | None], name: str, value: str) -> None:
    saved.setdefault(name, os.environ.get(name))
    os.environ[name] = value


def _restore_env(saved: dict[str, str | None]) -> None:
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    saved.clear()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` (``""``: every interface) that was free a moment ago (the OS
    picks it)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def run_training(job: JobConfig, preflight: bool = True) -> dict:
    """Run the job to completion and return the summary (also written to ``RUN_DIR/summary.json``).

    With ``cluster.address`` set and ``preflight``, every node's Python (and the job's paths) is
    checked before the workers start (:func:`orchestrator.preflight.preflight_connected`).

    Raises:
        DataError, ConfigError, PlanError: before anything starts.
        ClusterError: Ray cannot be reached, or a node fails the preflight.
        JobFailedError: the workers failed more often than ``cluster.max_failures`` allows, or
            the divergence guard stopped the run (``summary.json`` then has ``status: diverged``).
    """
    from orchestrator.startup import StartupWatchdog, check_placeable

    fresh = not job.run_dir.exists()
    try:
        data_text = check_data(job)
        plan = build_run_plan(job)
        check_resumable(job, plan)
        plan = attach_privacy(job, plan)
        plan = attach_finetune(job, plan)
        plan = attach_distill(job, plan)
    except MLAError:
        if fresh:  # only check_data's BPE tokenizer.json can be there: a refusal writes nothing
            shutil.rmtree(job.run_dir, ignore_errors=True)
        raise
    run_dir = plan.run_dir
    load_torch_before_ray()
    with ray_session(job) as handle:
        if preflight and job.cluster.address:
            check_cluster(job, handle)
        check_placeable(job, plan.world_sizes)  # before the run folder: nothing half-written
        make_run_dir(job, run_dir)
        print_header(plan, data_text)
        endpoint = metrics_endpoint(handle)
        if endpoint:
            console.print(f"metrics: {endpoint} (Prometheus; `mla metrics scrape-config`)")
        write_json_atomic(run_dir / "job.json", job.model_dump(mode="json"))
        (run_dir / FAILURE_FILE).unlink(
            missing_ok=True
        )  # a diverged earlier attempt of this run name
        tail = ProgressTail(run_dir / "metrics.jsonl", job.train.steps)
        watchdog = StartupWatchdog(job, plan.world_sizes, run_dir, job.cluster.startup_timeout_s)
        started = time.time()
        try:
            tail.start()
            watchdog.start()
            try:
                result = _fit(plan)
            except (KeyboardInterrupt, SystemExit):
                # Ray Train's own SIGINT handler (installed by fit()) aborts the controller and
                # may call sys.exit(0): the watchdog's reason must still reach the user.
                if watchdog.reason is None:
                    raise
                raise ClusterError(watchdog.reason) from None
            finally:
                watchdog.done.set()
            # ... or fit() returns after that abort instead of raising.
            if watchdog.reason is not None:
                raise ClusterError(watchdog.reason)
        finally:
            tail.stop_event.set()
            tail.join(timeout=5)
    if result.error is not None:
        raise JobFailedError(
            f"training failed: {_root_cause(result.error)} (run folder: {run_dir})"
        ) from result.error
    summary = build_summary(job, run_dir, time.time() - started, plan.privacy, plan.finetune)
    failure = _read_failure(run_dir)
    if failure is not None:
        summary.update(status="diverged", error=failure.get("message"))
        write_json_atomic(run_dir / "summary.json", summary)
        raise JobFailedError(
            f"{failure.get('message')} (run folder: {run_dir}; the last good checkpoint is "
            f"{summary['checkpoint']})"
        )
    summary["status"] = "done"
    write_json_atomic(run_dir / "summary.json", summary)
    spent = f", epsilon {summary['epsilon']:.3g}" if plan.privacy is not None else ""
    console.print(
        f"done: {summary['steps']} steps, val_loss {summary['first_val_loss']} -> "
        f"{summary['last_val_loss']}{spent}, {summary['tokens_per_s']:,.0f} tokens/s; summary: "
        f"{run_dir / 'summary.json'}"
    )
    return summary


def build_trainer(plan: RunPlan, callbacks: list | tuple = ()):
    """The ``TorchTrainer`` for ``plan``: one worker per process (an elastic ``(min, max)``
    range when ``cluster.min_workers`` is set), gloo on CPU / nccl on GPU, ``FailureConfig``
    retries, and the run folder as Ray Train's storage (``RUN_DIR``).

    Checkpoints have one owner, :mod:`workers.checkpoint` (``RUN_DIR/checkpoints/step_N``), and
    Ray Train gets none: no ``Checkpoint`` is reported and no ``CheckpointConfig`` retention is
    set. Why not the other way round (report the folder and resume via
    ``ray.train.get_checkpoint()``): the checkpoint is a collective DeepSpeed save of every rank
    into a folder that is already on the shared run storage, completed by rank 0's atomic
    rename; reporting it would make Ray Train copy (or upload) it again per attempt, and the
    resume rule would still need our own ``meta.json`` layout check (ZeRO-3) and the
    newest-complete-folder scan that also serves the driver's pre-launch check, ``mla k8s`` and
    the summary. A pointer checkpoint beside it was a second registry that deleted folders and
    was never read.

    DeepSpeed Universal Checkpointing (``deepspeed/checkpoint/ds_to_universal.py`` plus
    ``"checkpoint": {"load_universal": true}``) is the route that would lift the ZeRO-3
    same-layout limit: it converts per-rank ZeRO shards into per-parameter fp32 + optimizer
    files that load under another dp/tp/pp. Verdict: not adopted now. It is an *offline*
    conversion (a separate pass over all shards between the kill and the restart, which Ray
    Train's in-place elastic restart has no hook for), and tensor-parallel reshaping needs
    ``UNIVERSAL_CHECKPOINT_INFO`` slicing patterns for our own parameter names (Megatron-
    DeepSpeed provides them for its layers only). ZeRO 0-2 already resume under any layout
    through :mod:`workers.parallel.reshard`; for ZeRO-3 the pre-launch check refuses a layout
    change with the fix. Not measured in this tree.
    """
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from workers.entry import train_loop_per_worker

    cluster = plan.job.cluster
    sizes = plan.world_sizes
    num_workers = (sizes[0], sizes[-1]) if len(sizes) > 1 else sizes[0]
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"plan": plan},
        torch_config=TorchConfig(backend="nccl" if cluster.use_gpu else "gloo"),
        # Train V2's ScalingConfig takes (min, max) for elastic training; mypy sees the V1 class
        # that ray.train re-exports when V2 is off.
        scaling_config=ScalingConfig(
            num_workers=num_workers,  # type: ignore[arg-type]
            use_gpu=cluster.use_gpu,
            resources_per_worker={"CPU": cluster.cpus_per_worker},
        ),
        run_config=RunConfig(
            name=plan.run_dir.name,
            storage_path=str(plan.run_dir.parent),
            failure_config=FailureConfig(max_failures=cluster.max_failures),
            callbacks=list(callbacks),
        ),
    )


def load_torch_before_ray() -> None:
    """Import torch before Ray connects: Ray Train's torch integration loads it in the driver
    anyway, and loaded after ``ray.init(address="auto")`` inside a Ray job's driver process its
    bundled oneMKL fails with "Intel oneMKL FATAL ERROR: Cannot load libtorch_cpu.so" (seen with
    Ray 2.60 / torch 2.13 CPU)."""
    import torch  # noqa: F401


def _fit(plan: RunPlan):
    try:
        return build_trainer(plan).fit()
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
