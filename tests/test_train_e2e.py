"""End to end: `mla train` runs DeepSpeed data-parallel workers under an embedded Ray Train,
survives a SIGKILLed worker by resuming from the last atomic checkpoint, and resumes a finished
run of the same name. Each test starts its own embedded Ray in a subprocess and stops it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from orchestrator.contract.checkpoints import complete_checkpoints

pytestmark = pytest.mark.slow


@pytest.fixture
def train_cmd(mla_cli, fast_overrides, tmp_path):
    """``train_cmd(*overrides)``: the `mla train` command of a fast tiny run under ``tmp_path``."""
    return lambda *overrides: mla_cli.command(
        "train", "configs/tiny.yaml", sets=[f"run.dir={tmp_path}", *fast_overrides, *overrides])


def _run(cmd: list[str], timeout: float = 400) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def _summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def test_two_worker_run_learns_and_a_rerun_resumes(tmp_path, train_cmd):
    first = _run(train_cmd("train.steps=30", "run.name=learn"))
    assert first.returncode == 0, first.stderr[-3000:]
    run_dir = tmp_path / "learn"
    summary = _summary(run_dir)
    assert summary["steps"] == 30 and summary["world_size"] == 2
    assert summary["layout"]["dp"] == 2 and summary["layout"]["zero_stage"] == 2
    assert summary["last_val_loss"] < 0.8 * summary["first_val_loss"]
    assert summary["resumed_from_step"] is None
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert {"step", "loss", "lr", "tokens_per_s"} <= set(records[1])
    assert "step    30/30" in first.stderr  # progress lines reach the user

    again = _run(train_cmd("train.steps=40", "run.name=learn"))
    assert again.returncode == 0, again.stderr[-3000:]
    summary = _summary(run_dir)
    assert summary["resumed_from_step"] == 30 and summary["steps"] == 40
    assert [s for s, _ in complete_checkpoints(run_dir)] == [30, 40]  # checkpoint.keep = 2


def test_sigkilled_worker_resumes_from_the_last_checkpoint(tmp_path, train_cmd):
    run_dir = tmp_path / "kill"
    proc = subprocess.Popen(train_cmd("train.steps=60", "run.name=kill", "cluster.max_failures=2"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while not complete_checkpoints(run_dir):
            assert proc.poll() is None and time.time() < deadline, "no checkpoint appeared"
            time.sleep(0.5)
        victim = json.loads((run_dir / "workers" / "rank_1.json").read_text())["pid"]
        os.kill(victim, signal.SIGKILL)
        _, stderr = proc.communicate(timeout=400)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr[-3000:]
    summary = _summary(run_dir)
    assert summary["steps"] == 60
    assert summary["attempts"] == 2 and summary["resumed_from_step"] >= 10
    assert not any(p.name.startswith(".tmp-") for p in (run_dir / "checkpoints").iterdir())
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps))  # records past the checkpoint were trimmed, none repeated


def test_bad_data_fails_before_anything_starts(tmp_path, train_cmd):
    result = _run(train_cmd("data.path=/no/such/corpus.txt", "run.name=bad"), timeout=60)
    assert result.returncode == 2
    assert "data.path '/no/such/corpus.txt' does not exist" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "bad").exists()
