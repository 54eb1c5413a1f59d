"""`mla submit` / `mla jobs` against a real two-node Ray cluster started by the test
(`ray start --head` + `ray start --address`), with Ray's token authentication on."""

from __future__ import annotations

import json

import pytest

from orchestrator.launcher import free_port
from tests.ray_cluster import ray_cluster


@pytest.mark.slow
def test_submit_follow_logs_resubmit_sweep_and_failure_on_a_two_node_cluster(
    tmp_path, mla_cli, fast_overrides
):
    def sets(*items: str) -> list[str]:
        return [a for s in (*fast_overrides, *items) for a in ("--set", s)]

    storage = tmp_path / "storage"
    storage.mkdir()  # an explicit --storage-path must exist on every node (the preflight checks)
    with ray_cluster(tmp_path) as cluster:
        auth = ["--address", cluster.address, "--token-file", str(cluster.token_file)]
        ok = mla_cli(
            "submit",
            "configs/tiny.yaml",
            *auth,
            "--storage-path",
            str(storage),
            "--follow",
            *sets("train.steps=20", "run.name=remote"),
        )
        assert ok.returncode == 0, ok.stderr[-4000:]
        assert "step    20/20" in ok.stderr  # --follow shows the driver's progress lines
        job_id = ok.stdout.split()[0]
        assert job_id.startswith("mla-remote-")
        summary = json.loads((storage / "remote" / "summary.json").read_text())
        assert summary["steps"] == 20 and summary["world_size"] == 2

        logs = mla_cli("jobs", "logs", job_id, *auth)
        assert logs.returncode == 0 and "step    20/20" in logs.stdout
        assert "SUCCEEDED" in mla_cli("jobs", "status", job_id, *auth).stdout
        listed = json.loads(mla_cli("jobs", "list", "--json", *auth).stdout)
        assert job_id in [j["id"] for j in listed]

        again = mla_cli(
            "submit",
            "configs/tiny.yaml",
            *auth,
            "--storage-path",
            str(storage),
            "--follow",
            *sets("train.steps=30", "run.name=remote"),
        )
        assert again.returncode == 0, again.stderr[-4000:]
        assert (
            json.loads((storage / "remote" / "summary.json").read_text())["resumed_from_step"] == 20
        )

        sweep = mla_cli(
            "submit",
            "configs/tiny.yaml",
            *auth,
            "--storage-path",
            str(storage),
            "--follow",
            "--tune",
            "--search",
            "model.global_k=2,8",
            "--scheduler",
            "fifo",
            "--max-steps",
            "10",
            *sets("run.name=remote"),
        )
        assert sweep.returncode == 0, sweep.stderr[-4000:]
        trials = json.loads((storage / "remote-sweep" / "trials.json").read_text())["trials"]
        assert sorted(t["model.global_k"] for t in trials) == [2, 8]
        assert all(t["steps"] == 10 for t in trials)
        assert (storage / "remote-sweep" / "best.yaml").is_file()

        bad = mla_cli(
            "submit",
            "configs/tiny.yaml",
            *auth,
            "--storage-path",
            str(storage),
            "--follow",
            *sets("data.path=/no/such/corpus.txt", "run.name=broken"),
        )
        assert bad.returncode == 2  # the preflight stops it before anything starts
        assert "data.path '/no/such/corpus.txt' does not exist on nodes" in " ".join(
            bad.stderr.split()
        )

        # Three one-CPU workers on a two-CPU cluster never start: the driver's startup watchdog
        # ends the job (through Ray Train's own SIGINT handler) with what was asked and what is
        # free, instead of waiting forever.
        stuck = mla_cli(
            "submit",
            "configs/tiny.yaml",
            *auth,
            "--storage-path",
            str(storage),
            "--follow",
            *sets(
                "cluster.num_workers=3",
                "train.global_batch=12",
                "cluster.startup_timeout_s=20",
                "run.name=stuck",
            ),
        )
        assert stuck.returncode != 0, stuck.stdout[-3000:]
        said = " ".join((stuck.stdout + stuck.stderr).split())
        assert "no worker group started within cluster.startup_timeout_s=20 s" in said, said[-3000:]
        assert "asked for CPU 3" in said and "Traceback" not in said.split("no worker group")[1]

        token = cluster.token_file.read_text().strip()
        for result in (ok, logs, again, sweep, bad, stuck):
            assert token not in result.stdout + result.stderr


def test_unreachable_cluster_says_what_was_tried_and_how_to_start_one(mla_cli):
    port = free_port("")
    result = mla_cli(
        "submit", "configs/tiny.yaml", "--address", f"http://127.0.0.1:{port}", timeout=120
    )
    assert result.returncode == 2
    assert f"cannot reach the Ray cluster at http://127.0.0.1:{port}" in result.stderr
    assert "ray start --head" in result.stderr and "Traceback" not in result.stderr


def test_invalid_config_is_rejected_on_the_client_before_submitting(mla_cli):
    result = mla_cli(
        "submit",
        "configs/tiny.yaml",
        "--address",
        "http://127.0.0.1:9",
        "--set",
        "model.top_k=3",
        timeout=120,
    )
    assert result.returncode == 2 and "unknown key 'top_k'" in result.stderr
    assert "cannot reach" not in result.stderr  # validation happened before any connection


def test_missing_address_names_the_flag_and_the_variable(monkeypatch, mla_cli):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    result = mla_cli("jobs", "list", timeout=120)
    assert (
        result.returncode == 2 and "--address" in result.stderr and "RAY_ADDRESS" in result.stderr
    )
