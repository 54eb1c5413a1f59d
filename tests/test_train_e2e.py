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
from tests.harness.cli import FAST_OVERRIDES, TINY_CONFIG, MlaCli

pytestmark = pytest.mark.slow


def _cmd(tmp_path: Path, *overrides: str) -> list[str]:
    """The `mla train` command of a fast tiny run under ``tmp_path`` (test_privacy_e2e uses it too)."""
    return MlaCli().command(
        "train", TINY_CONFIG, sets=[f"run.dir={tmp_path}", *FAST_OVERRIDES, *overrides]
    )


def _run(cmd: list[str], timeout: float = 400) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def _summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def test_two_worker_run_learns_and_a_rerun_resumes(tmp_path):
    first = _run(_cmd(tmp_path, "train.steps=30", "run.name=learn"))
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

    # a crash during a write (or a full disk) left a zero-byte file in the newest checkpoint, and
    # an earlier attempt left a temporary folder of another step
    newest = complete_checkpoints(run_dir)[-1][1]
    assert newest.name == "step_0000030" and (newest / "manifest.json").is_file()
    victim = next(p for p in sorted((newest / "consolidated").iterdir()) if p.suffix == ".pt")
    victim.write_bytes(b"")
    (run_dir / "checkpoints" / ".tmp-step_0000005").mkdir()
    again = _run(_cmd(tmp_path, "train.steps=40", "run.name=learn"))
    assert again.returncode == 0, again.stderr[-3000:]
    err = " ".join(again.stderr.split())
    assert f"checkpoint step_0000030 rejected: consolidated/{victim.name} has 0 bytes" in err
    assert "resuming from step_0000020" in err and "Traceback" not in again.stderr
    summary = _summary(run_dir)
    assert summary["resumed_from_step"] == 20 and summary["steps"] == 40
    assert [s for s, _ in complete_checkpoints(run_dir)] == [30, 40]  # checkpoint.keep = 2
    assert sorted(
        p.name for p in (run_dir / "checkpoints").iterdir() if not p.name.startswith("step_")
    ) == ["rejected-step_0000030"]  # the stale .tmp- folder is gone, the corrupt one set aside


def test_sigkilled_worker_resumes_from_the_last_checkpoint(tmp_path):
    run_dir = tmp_path / "kill"
    proc = subprocess.Popen(
        _cmd(tmp_path, "train.steps=60", "run.name=kill", "cluster.max_failures=2"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
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
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records]
    assert steps == sorted(set(steps))  # records past the checkpoint were trimmed, none repeated
    # TensorBoard (rank 0's events, RUN_DIR/tb): the killed attempt's steps past the checkpoint
    # are purged on resume, so every logged step appears once, as in metrics.jsonl
    from tests.test_tensorboard import read

    board = read(run_dir)
    assert [e.step for e in board.Scalars("train/loss")] == steps[1:]  # step 0 has no loss
    assert {"perf/mfu", "memory/peak_gib", "val/loss"} <= set(board.Tags()["scalars"])
    maps = board.Images("attention/map/layer_0_head_0")  # one per evaluation, none repeated
    assert [e.step for e in maps] == [r["step"] for r in records if "val_loss" in r]


def test_bad_data_fails_before_anything_starts(tmp_path):
    result = _run(_cmd(tmp_path, "data.path=/no/such/corpus.txt", "run.name=bad"), timeout=60)
    assert result.returncode == 2
    assert "data.path '/no/such/corpus.txt' does not exist" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "bad").exists()


def test_divergence_stops_the_run_and_keeps_the_good_checkpoints(tmp_path):
    """lr=1e6 on a resumed run: DeepSpeed skips every step (loss stuck at ln 256); the guard stops
    the run with exit 1 naming the step, writes no checkpoint from the bad streak and keeps the
    good ones; metrics and summary stay strict JSON."""
    run_dir = tmp_path / "div"
    good = _run(
        _cmd(tmp_path, "train.steps=10", "run.name=div", "checkpoint.every=5", "train.log_every=1")
    )
    assert good.returncode == 0, good.stderr[-3000:]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert records[1]["step"] == 1 and records[1]["lr"] == pytest.approx(
        3e-3 / 5
    )  # the lr step 1 used
    bad = _run(
        _cmd(
            tmp_path,
            "train.steps=30",
            "run.name=div",
            "checkpoint.every=5",
            "train.lr=1e6",
            "train.min_lr=0",
            "train.max_bad_steps=4",
        )
    )
    assert bad.returncode == 1, bad.stderr[-3000:]
    assert "training diverged" in bad.stderr and "lower train.lr" in bad.stderr
    assert [s for s, _ in complete_checkpoints(run_dir)] == [5, 10]
    strict = {"parse_constant": lambda c: pytest.fail(f"non-strict JSON constant {c}")}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        json.loads(line, **strict)
    summary = json.loads((run_dir / "summary.json").read_text(), **strict)
    assert summary["status"] == "diverged" and summary["steps"] < 30


def test_more_workers_than_the_embedded_ray_has_fails_with_the_reason(tmp_path):
    result = _run(
        _cmd(
            tmp_path,
            "cluster.num_workers=3",
            "cluster.ray_num_cpus=2",
            "train.global_batch=24",
            "run.name=big",
        ),
        timeout=120,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert "the workers cannot be placed: CPU 3 asked, 2 in the cluster" in " ".join(
        result.stderr.split()
    )
    assert "Traceback" not in result.stderr
