"""End to end: `mla train` fine-tunes the last layers of another run's checkpoint. The fine-tune
starts at that checkpoint's validation loss, reports trainable vs total parameters, and bad
fine-tuning input stops `mla train` before launch with exit status 2 and no traceback."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.harness.cli import FAST_OVERRIDES, TINY_CONFIG, MlaCli


def _train(tmp_path: Path, *overrides: str, timeout: float = 400) -> subprocess.CompletedProcess:
    sets = [f"run.dir={tmp_path}", *FAST_OVERRIDES, *overrides]
    return MlaCli()("train", TINY_CONFIG, sets=sets, timeout=timeout)


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_fine_tune_starts_at_the_checkpoint_validation_loss(tmp_path):
    source = _train(tmp_path, "run.name=source", "train.steps=10")
    assert source.returncode == 0, source.stderr[-3000:]
    source_val = [r["val_loss"] for r in _records(tmp_path / "source") if "val_loss" in r][-1]

    tuned = _train(
        tmp_path,
        "run.name=tuned",
        "train.steps=5",
        f"model.init_from={tmp_path / 'source'}",
        "train.trainable_last_layers=1",
        "train.train_head=false",
    )
    assert tuned.returncode == 0, tuned.stderr[-3000:]
    first = _records(tmp_path / "tuned")[0]
    assert first["step"] == 0 and abs(first["val_loss"] - source_val) <= 1e-4
    summary = json.loads((tmp_path / "tuned" / "summary.json").read_text())
    assert 0 < summary["trainable_parameters"] < 0.3 * summary["total_parameters"]
    assert summary["init_from"].endswith("source/checkpoints/step_0000010")
    header = (
        f"{summary['total_parameters']:,} parameters ({summary['trainable_parameters']:,} trainable"
    )
    assert header in tuned.stderr and "init_from: checkpoint step 10" in tuned.stderr


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (["train.freeze=[blocks.9.*]"], "train.freeze pattern 'blocks.9.*' matches no parameter"),
        (["train.trainable_last_layers=7"], "train.trainable_last_layers(7) must be between 0"),
        (["model.init_from=/no/such/run"], "model.init_from: /no/such/run does not exist"),
    ],
)
def test_bad_fine_tuning_input_stops_before_launch(tmp_path, sets, message):
    out = _train(tmp_path, *sets, timeout=120)
    assert out.returncode == 2, out.stderr[-2000:]
    assert message in " ".join(out.stderr.split()) and "Traceback" not in out.stderr
    assert not (tmp_path / "tiny").exists()  # nothing was started or written
