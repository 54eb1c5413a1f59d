"""After a worker-group restart the console says so and continues from the resumed step
instead of reprinting the history from step 0."""

from __future__ import annotations

import json
import os

from orchestrator.progress import ProgressTail


def _write(path, records, mode="a"):
    with open(path, mode) as fh:
        for r in records:
            fh.write(json.dumps(r) + "\n")


def test_restart_prints_attempt_and_resumes_progress_after_the_checkpoint(tmp_path, capsys):
    metrics, events = tmp_path / "metrics.jsonl", tmp_path / "events.jsonl"
    tail = ProgressTail(metrics, 30)
    _write(events, [{"event": "start", "resumed_from_step": None}])
    _write(
        metrics,
        [{"step": 0, "val_loss": 5.2}]
        + [{"step": s, "loss": 4.0, "lr": 1e-3} for s in (5, 10, 15)],
    )
    tail.poll()
    # a worker is killed after step 15; the restart trims the records past checkpoint 10
    tmp = metrics.with_suffix(".tmp")
    _write(
        tmp,
        [{"step": 0, "val_loss": 5.2}, {"step": 5, "loss": 4.0}, {"step": 10, "loss": 4.0}],
        mode="w",
    )
    os.replace(tmp, metrics)
    _write(events, [{"event": "start", "resumed_from_step": 10}])
    tail.poll()
    _write(metrics, [{"step": 15, "loss": 3.9, "lr": 1e-3}, {"step": 20, "loss": 3.8, "lr": 1e-3}])
    tail.poll()
    import re

    text = " ".join(capsys.readouterr().err.split())  # rich may wrap long lines
    steps = re.findall(r"step (\d+)/30", text)
    assert steps == ["0", "5", "10", "15", "15", "20"]  # 0-10 never reprinted after the restart
    restart = "worker group restarted (attempt 2), resumed from step 10; progress continues at step 11 step 15/30"
    assert restart in text
