"""Fail a job whose workers cannot be placed, with the reason, instead of waiting forever.

Ray Train waits for a placement group holding every worker's resources; when the cluster can
never provide them (more workers than CPUs or GPUs) the job stays RUNNING and Ray's own "worker
group startup timed out" lines go only to its logs. Two checks:

* :func:`check_placeable` before launch: a job on an embedded Ray (whose size is fixed) that asks
  for more than the cluster has is refused at once;
* :class:`StartupWatchdog` during launch: on any cluster (an autoscaler may still add nodes),
  if no worker group has started after ``cluster.startup_timeout_s``, the driver stops waiting
  and reports what was asked and what is available.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterable
from pathlib import Path

from orchestrator.config import JobConfig
from orchestrator.contract.errors import ClusterError


def resources_asked(job: JobConfig, sizes: Iterable[int | str]) -> dict[str, float]:
    """Resources of the smallest worker group (of the runnable world ``sizes``) the job can start
    with: ``{"CPU": .., "GPU": ..}``."""
    workers = min(int(w) for w in sizes)
    asked = {"CPU": workers * job.cluster.cpus_per_worker}
    if job.cluster.use_gpu:
        asked["GPU"] = float(workers)
    return asked


def shortfall(asked: dict[str, float], available: dict[str, float]) -> str | None:
    """``"CPU 4 asked, 2 in the cluster"``-style text for every short resource, or ``None``."""
    short = [
        f"{k} {v:g} asked, {available.get(k, 0.0):g} in the cluster"
        for k, v in asked.items()
        if v > available.get(k, 0.0) + 1e-9
    ]
    return "; ".join(short) or None


def _fix(job: JobConfig) -> str:
    return (
        "lower cluster.num_workers (or set cluster.min_workers), lower cluster.cpus_per_worker, "
        "or add nodes" + ("" if job.cluster.address else " / raise cluster.ray_num_cpus")
    )


def check_placeable(job: JobConfig, sizes: Iterable[int | str]) -> None:
    """Refuse a job the embedded Ray can never place (its resources are fixed at start).

    Raises:
        ClusterError: naming the resources asked and those available, and the fix.
    """
    if job.cluster.address:
        return
    import ray

    problem = shortfall(resources_asked(job, sizes), ray.cluster_resources())
    if problem:
        raise ClusterError(f"the workers cannot be placed: {problem}; {_fix(job)}")


#: SIGINTs after which Ray Train's driver-side handler stops waiting for a graceful abort.
RAY_FORCED_ABORT_SIGINTS = 3
#: Seconds the watchdog gives a graceful abort before the next SIGINT.
ABORT_GRACE_S = 10.0


class StartupWatchdog(threading.Thread):
    """Interrupt the driver if no worker group starts within ``timeout_s``.

    A start is a new ``start`` record in ``RUN_DIR/events.jsonl`` (rank 0 writes one per worker
    group start). ``reason`` holds the message once it fired.
    """

    def __init__(self, job: JobConfig, sizes: Iterable[int | str], run_dir: Path, timeout_s: float):
        super().__init__(daemon=True)
        self.job, self.sizes, self.timeout_s = job, list(sizes), timeout_s
        self.events = run_dir / "events.jsonl"
        self.before = self._starts()
        self.done = threading.Event()
        self.reason: str | None = None

    def _starts(self) -> int:
        try:
            return self.events.read_text().count('"event": "start"')
        except OSError:
            return 0

    def run(self) -> None:
        deadline = time.time() + self.timeout_s
        while not self.done.wait(1.0):
            if self._starts() > self.before:
                return
            if time.time() > deadline:
                self.reason = self._message()
                self._interrupt()
                return

    def _interrupt(self) -> None:
        """Interrupt the driver's main thread until the launcher acknowledges (``done``).

        During ``fit()`` Ray Train V2 replaces the SIGINT handler
        (``DataParallelTrainer._register_sigint_handler``): the first SIGINT asks the controller
        to abort and waits for it, which never returns while the controller itself waits for a
        placement group; the third SIGINT makes the handler call ``sys.exit``. So the interrupt
        is repeated, ``ABORT_GRACE_S`` apart, up to ``RAY_FORCED_ABORT_SIGINTS`` times; with
        Python's default handler the first one already ends ``fit()``.
        """
        for _ in range(RAY_FORCED_ABORT_SIGINTS):
            # a real signal to the main thread, unlike _thread.interrupt_main(), also wakes a
            # blocking system call there
            signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGINT)
            if self.done.wait(ABORT_GRACE_S):
                return

    def _message(self) -> str:
        asked = resources_asked(self.job, self.sizes)
        try:
            import ray

            if not ray.is_initialized():
                raise RuntimeError("not connected")
            available = ray.available_resources()
            total = ray.cluster_resources()
        except Exception:  # Ray gone: say what was asked
            available, total = {}, {}
        have = ", ".join(
            f"{k} {available.get(k, 0.0):g} free of {total.get(k, 0.0):g}" for k in asked
        )
        return (
            f"no worker group started within cluster.startup_timeout_s={self.timeout_s:g} s: asked for "
            f"{', '.join(f'{k} {v:g}' for k, v in asked.items())}, the cluster has {have}; {_fix(self.job)}, "
            "or raise cluster.startup_timeout_s if nodes are still being added"
        )
