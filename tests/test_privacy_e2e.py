"""End to end: a private `mla train` run (2 DeepSpeed workers, ZeRO-1, embedded Ray) reports the
epsilon Opacus' accountant gives for its sampling rate, noise and steps, and a resumed run
continues the accountant from its checkpoint; a run over budget is refused before launch."""

from __future__ import annotations

import json
import re

import pytest

from orchestrator.config import load_job_config
from orchestrator.privacy import training_sequences
from tests.test_train_e2e import _cmd, _run, _summary

pytestmark = pytest.mark.slow
PRIVATE = ["parallel.zero_stage=1", "checkpoint.every=10"]


def _opacus_epsilon(schedule: list[tuple[float, int]], q: float, delta: float) -> float:
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    for sigma, steps in schedule:
        for _ in range(steps):
            accountant.step(noise_multiplier=sigma, sample_rate=q)
    return accountant.get_epsilon(delta=delta)


def test_private_run_reports_opacus_epsilon_and_a_resume_continues_the_accountant(tmp_path):
    first = _run(
        _cmd(
            tmp_path,
            *PRIVATE,
            "train.steps=10",
            "run.name=dp",
            "train.privacy.noise_multiplier=1.0",
        )
    )
    assert first.returncode == 0, first.stderr[-3000:]
    again = _run(
        _cmd(
            tmp_path,
            *PRIVATE,
            "train.steps=20",
            "run.name=dp",
            "train.privacy.noise_multiplier=1.5",
        )
    )
    assert again.returncode == 0, again.stderr[-3000:]

    job = load_job_config("configs/tiny.yaml", ["data.seq_len=64"])
    n = training_sequences(job)
    q, delta = 16 / n, 1 / (2 * n)
    run_dir = tmp_path / "dp"
    records = {
        r["step"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
    }
    assert records[0]["epsilon"] == 0.0
    assert records[10]["epsilon"] == pytest.approx(_opacus_epsilon([(1.0, 10)], q, delta), rel=1e-5)
    # A fresh accountant would give epsilon(1.5, 10 steps); the resumed one composes both parts.
    assert records[20]["epsilon"] == pytest.approx(
        _opacus_epsilon([(1.0, 10), (1.5, 10)], q, delta), rel=1e-5
    )
    assert records[20]["epsilon"] > _opacus_epsilon([(1.5, 10)], q, delta) * 1.2
    meta = json.loads((run_dir / "checkpoints" / "step_0000020" / "meta.json").read_text())
    assert meta["privacy"]["history"] == [[1.0, q, 10], [1.5, q, 10]]
    summary = _summary(run_dir)
    assert summary["resumed_from_step"] == 10 and summary["epsilon"] == records[20]["epsilon"]
    assert summary["delta"] == pytest.approx(delta) and summary["privacy"][
        "sample_rate"
    ] == pytest.approx(q)
    assert "eps " in again.stderr and "privacy: DP-SGD, Poisson sampling" in again.stderr


def test_a_run_over_its_budget_is_refused_before_launch_with_the_steps_it_can_afford(tmp_path):
    result = _run(
        _cmd(
            tmp_path,
            *PRIVATE,
            "train.steps=1000",
            "run.name=over",
            "train.privacy.target_epsilon=1.7",
            "train.privacy.noise_multiplier=0.6",
        ),
        timeout=120,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    text = " ".join(result.stderr.split())
    assert (
        "over target_epsilon(1.7)" in text
        and "Traceback" not in text
        and not (tmp_path / "over").exists()
    )
    afford = int(re.search(r"the budget affords (\d+) steps: set train.steps=(\d+)", text).group(1))
    assert 100 < afford < 400  # epsilon(0.6, q=16/N) is 1.66 at 100 steps and 1.71 at 400
