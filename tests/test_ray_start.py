"""A local Ray cluster that does not start (a startup timeout under load, an unusable temp
folder) ends in one ClusterError message with the numbers and the fixes, exit 2, no traceback
from the launcher. The failure is a real one of ``ray.init``: ``RAY_TMPDIR`` names a path below
a file, so Ray cannot create its session folder (a timeout cannot be produced on demand; it
takes the same path through :func:`orchestrator.launcher._connect`)."""

from __future__ import annotations

import pytest


@pytest.mark.slow
def test_a_local_ray_that_cannot_start_is_one_message_and_exit_2(mla_cli, monkeypatch):
    monkeypatch.setenv("RAY_TMPDIR", "/dev/null/ray")
    result = mla_cli("train", "configs/tiny.yaml", sets=["train.steps=2"], timeout=120)
    assert result.returncode == 2
    assert "error: could not start a local Ray cluster (num_cpus=" in result.stderr
    assert "cluster.object_store_mb=256" in result.stderr and "ray start --head" in result.stderr
    assert "Traceback" not in result.stderr


def test_the_start_failure_message_names_the_root_cause_and_the_numbers():
    from orchestrator.launcher import _local_start_failure

    exc = Exception(
        "The current node timed out during startup. This could happen because some of the "
        "raylet failed to startup or the GCS has become overloaded."
    )
    text = _local_start_failure(exc, 2, 256)
    assert text.startswith("could not start a local Ray cluster (num_cpus=2, ")
    assert "timed out during startup" in text and "cluster.ray_num_cpus" in text
