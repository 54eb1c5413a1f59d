"""What a running job shows and leaves behind: progress lines, the header, the summary.

Progress comes from tailing ``RUN_DIR/metrics.jsonl`` (rank 0 appends one record per logged
step) rather than from a Ray Train ``UserCallback.after_report``: that callback runs inside the
Train controller actor, so its lines would still have to be forwarded to the driver's terminal,
while the file is already on the driver's disk (or shared volume) and survives restarts.
Human output goes to stderr (:data:`orchestrator.cli_common.err`).
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

from orchestrator.cli_common import err as console
from orchestrator.config import JobConfig
from orchestrator.contract.checkpoints import latest_checkpoint
from orchestrator.contract.run_plan import RunPlan


class ProgressTail(threading.Thread):
    """Print new ``metrics.jsonl`` records as progress lines while training runs."""

    def __init__(self, path: Path, total_steps: int):
        super().__init__(daemon=True)
        self.path = path
        self.total_steps = total_steps
        self.offset = path.stat().st_size if path.exists() else 0
        self.stop_event = threading.Event()
        self.started_at = time.time()

    def run(self) -> None:
        while not self.stop_event.wait(0.5):
            self.poll()
        self.poll()

    def poll(self) -> None:
        if not self.path.exists():
            return
        with open(self.path) as fh:
            if self.path.stat().st_size < self.offset:  # trimmed on resume
                self.offset = 0
            fh.seek(self.offset)
            chunk = fh.read()
        complete = chunk[: chunk.rfind("\n") + 1]
        self.offset += len(complete.encode())
        for line in complete.splitlines():
            if line.strip():
                console.print(format_progress(json.loads(line), self.total_steps, time.time() - self.started_at))


def format_progress(record: dict, total_steps: int, elapsed_s: float) -> str:
    """One progress line: ``step 40/200  loss 2.3141  val 2.2810  tok/s 5,210  lr 2.9e-03  12s``."""
    parts = [f"step {record['step']:>5}/{total_steps}"]
    if "loss" in record:
        parts.append(f"loss {record['loss']:.4f}")
    if "val_loss" in record:
        parts.append(f"val {record['val_loss']:.4f}")
    if "tokens_per_s" in record:
        parts.append(f"tok/s {record['tokens_per_s']:,.0f}")
    if "lr" in record:
        parts.append(f"lr {record['lr']:.2e}")
    parts.append(f"{elapsed_s:,.0f}s")
    return "  ".join(parts)


def build_summary(job: JobConfig, run_dir: Path, wall_time_s: float) -> dict:
    """Summarise ``metrics.jsonl`` and ``events.jsonl`` of a finished run."""
    records = _read_jsonl(run_dir / "metrics.jsonl")
    events = [e for e in _read_jsonl(run_dir / "events.jsonl") if e.get("event") == "start"]
    vals = [r for r in records if "val_loss" in r]
    speeds = [r["tokens_per_s"] for r in records if "tokens_per_s" in r]
    resumes = [e for e in events if e.get("resumed_from_step") is not None]
    found = latest_checkpoint(run_dir)
    last_event = events[-1] if events else {}
    return {
        "run": job.run.name,
        "steps": max((r["step"] for r in records), default=0),
        "first_val_loss": vals[0]["val_loss"] if vals else None,
        "last_val_loss": vals[-1]["val_loss"] if vals else None,
        "val_loss": [{"step": r["step"], "val_loss": r["val_loss"]} for r in vals],
        "tokens_per_s": sum(speeds) / len(speeds) if speeds else 0.0,
        "wall_time_s": round(wall_time_s, 2),
        "layout": last_event.get("layout"),
        "world_size": last_event.get("world_size"),
        "attempts": len(events),
        "resumed_from_step": resumes[-1]["resumed_from_step"] if resumes else None,
        "resumes": [{"step": e["resumed_from_step"], "world_size": e["world_size"]} for e in resumes],
        "checkpoint": str(found[1]) if found else None,
    }


def _read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def print_header(plan: RunPlan, data_text: str) -> None:
    """Three lines before training: parameters and attention, data, layout and run folder."""
    from mla.flops import count_parameters

    job, layout, run_dir = plan.job, plan.main_layout, plan.run_dir
    model = plan.model
    sizes = ", ".join(map(str, plan.world_sizes))
    console.print(f"mla train {job.run.name}: {count_parameters(model):,} parameters, "
                  f"attention={model.attention} (window {model.local_window}, top-k {model.global_k})")
    console.print(f"data: {data_text}")
    console.print(f"layout: {layout.describe()}  (world sizes: {sizes}); run folder: {run_dir}")
