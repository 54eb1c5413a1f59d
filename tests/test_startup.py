"""A job whose workers cannot be placed fails with the resources asked vs available."""

from __future__ import annotations

import signal
import sys
import time

import pytest

from orchestrator.config import JobConfig
from orchestrator.startup import StartupWatchdog, resources_asked, shortfall


def test_shortfall_names_each_short_resource():
    assert shortfall({"CPU": 4.0}, {"CPU": 2.0}) == "CPU 4 asked, 2 in the cluster"
    assert shortfall({"CPU": 2.0, "GPU": 2.0}, {"CPU": 8.0}) == "GPU 2 asked, 0 in the cluster"
    assert shortfall({"CPU": 2.0}, {"CPU": 2.0}) is None


def test_elastic_jobs_ask_for_their_smallest_group():
    job = JobConfig(cluster={"num_workers": 4, "min_workers": 2, "cpus_per_worker": 1.5})
    assert resources_asked(job, {"2": {}, "4": {}}) == {"CPU": 3.0}


def test_watchdog_interrupts_the_driver_with_the_reason(tmp_path, monkeypatch):
    # No Ray in this process (an earlier test's stale connection must not be asked): the
    # message then names what was asked, without the cluster's side.
    monkeypatch.setitem(sys.modules, "ray", None)
    job = JobConfig(cluster={"num_workers": 3, "startup_timeout_s": 0.5})
    watchdog = StartupWatchdog(job, {"3": {}}, tmp_path, 0.5)
    # An earlier test's Ray Train fit() leaves its own SIGINT handler installed; the driver's
    # default one is what this test is about.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        watchdog.start()
        with pytest.raises(KeyboardInterrupt):
            time.sleep(10)
    finally:
        # Acknowledge, as the launcher does: otherwise the watchdog repeats the SIGINT
        # ABORT_GRACE_S later, into whichever test runs then.
        watchdog.done.set()
        watchdog.join(timeout=5)
        signal.signal(signal.SIGINT, previous)
    assert (
        "no worker group started within cluster.startup_timeout_s=0.5 s: asked for CPU 3"
        in watchdog.reason
    )


def test_watchdog_repeats_the_interrupt_until_ray_trains_handler_gives_up(tmp_path, monkeypatch):
    # Ray Train V2's SIGINT handler (installed during fit) waits on the controller's abort at the
    # first SIGINT, ignores the second and calls sys.exit at the third.
    monkeypatch.setitem(sys.modules, "ray", None)
    monkeypatch.setattr("orchestrator.startup.ABORT_GRACE_S", 0.2)
    seen = []

    def ray_like_handler(signum, frame):
        seen.append(signum)
        if len(seen) >= 3:
            sys.exit(0)

    watchdog = StartupWatchdog(JobConfig(), {"2": {}}, tmp_path, 0.3)
    previous = signal.signal(signal.SIGINT, ray_like_handler)
    try:
        watchdog.start()
        with pytest.raises(SystemExit):
            time.sleep(20)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert len(seen) == 3 and watchdog.reason is not None


def test_watchdog_stays_quiet_once_a_worker_group_started(tmp_path):
    job = JobConfig()
    watchdog = StartupWatchdog(job, {"2": {}}, tmp_path, 1.5)
    watchdog.start()
    (tmp_path / "events.jsonl").write_text('{"event": "start"}\n')
    time.sleep(2.5)
    assert watchdog.reason is None and not watchdog.is_alive()


def test_asking_for_gpus_on_a_cpu_only_ray_names_use_gpu_false(monkeypatch):
    import types

    from orchestrator.contract.errors import ClusterError
    from orchestrator.startup import check_placeable

    fake_ray = types.SimpleNamespace(cluster_resources=lambda: {"CPU": 2.0})
    monkeypatch.setitem(sys.modules, "ray", fake_ray)
    job = JobConfig(cluster={"num_workers": 1, "use_gpu": True})
    with pytest.raises(ClusterError) as exc:
        check_placeable(job, {"1": {}})
    assert "GPU 1 asked, 0 in the cluster" in str(exc.value)
    assert "cluster.use_gpu=false" in str(exc.value)


def test_an_unplaceable_job_leaves_no_run_folder(tmp_path, monkeypatch, tiny_job):
    import contextlib
    import types

    from orchestrator import launcher
    from orchestrator.contract.errors import ClusterError

    fake_ray = types.SimpleNamespace(cluster_resources=lambda: {"CPU": 2.0})
    monkeypatch.setitem(sys.modules, "ray", fake_ray)
    monkeypatch.setattr(launcher, "load_torch_before_ray", lambda: None)
    monkeypatch.setattr(launcher, "ray_session", lambda job: contextlib.nullcontext(None))
    job = tiny_job(f"run.dir={tmp_path / 'runs'}", "cluster.use_gpu=true")
    with pytest.raises(ClusterError, match="cluster.use_gpu=false"):
        launcher.run_training(job)
    assert not (tmp_path / "runs").exists()
