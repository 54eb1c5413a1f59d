"""What a running job shows and leaves behind: progress lines, the header, the summary.

Progress comes from tailing ``RUN_DIR/metrics.jsonl`` (rank 0 appends one record per logged
step) rather than from a Ray Train ``UserCallback.after_report``: that callback runs inside the
Train controller actor, so its lines would still have to be forwarded to the driver's terminal,
while the file is already on the driver's disk (or shared volume) and survives restarts.
Human output goes to stderr (:data:`orchestrator.cli_common.err`).
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

from orchestrator.cli_common import err as console
from orchestrator.config import JobConfig
from orchestrator.contract.checkpoints import latest_checkpoint
from orchestrator.contract.finetune import FinetunePlan
from orchestrator.contract.privacy import PrivacyPlan
from orchestrator.contract.run_plan import RunPlan


class ProgressTail(threading.Thread):
    """Print new ``metrics.jsonl`` records as progress lines while training runs, and each
    (re)start of the worker group from ``events.jsonl``.

    After a restart the workers trim ``metrics.jsonl`` back to the checkpoint they resumed from;
    those records were printed already, so the tail skips what the trimmed file holds and
    prints "worker group restarted (attempt k), resumed from step N", then steps N + 1 onwards.
    """

    def __init__(self, path: Path, total_steps: int):
        super().__init__(daemon=True)
        self.path, self.total_steps = path, total_steps
        self.events_path = path.with_name("events.jsonl")
        self.offset = path.stat().st_size if path.exists() else 0
        self.events_offset = self.events_path.stat().st_size if self.events_path.exists() else 0
        self.attempts = 0
        self.stop_event = threading.Event()
        self.started_at = time.time()

    def run(self) -> None:
        while not self.stop_event.wait(0.5):
            self.poll()
        self.poll()

    def poll(self) -> None:
        for event in self._new_lines(self.events_path, "events_offset"):
            if event.get("event") == "start":
                self.attempts += 1
                console.print(restart_line(self.attempts, event.get("resumed_from_step")))
        for record in self._new_lines(self.path, "offset"):
            console.print(format_progress(record, self.total_steps, time.time() - self.started_at))

    def _new_lines(self, path: Path, attr: str) -> list[dict]:
        """Complete JSON lines appended to ``path`` since the last poll; a file that shrank
        (trimmed on resume) holds only records printed before, so reading restarts at its end."""
        if not path.exists():
            return []
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            if size < getattr(self, attr):
                setattr(self, attr, size)
            fh.seek(getattr(self, attr))
            chunk = fh.read()
        complete = chunk[: chunk.rfind(b"\n") + 1]
        setattr(self, attr, getattr(self, attr) + len(complete))
        out = []
        for line in complete.decode("utf-8", errors="replace").splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out


def restart_line(attempt: int, resumed_from: int | None) -> str:
    """The console line for the ``attempt``-th start of the worker group in this invocation."""
    if attempt > 1:
        return (
            f"worker group restarted (attempt {attempt}), resumed from step {resumed_from or 0}; "
            f"progress continues at step {(resumed_from or 0) + 1}"
        )
    if resumed_from is not None:
        return f"resumed from step {resumed_from}"
    return "workers started"


def format_progress(record: dict, total_steps: int, elapsed_s: float) -> str:
    """One progress line, e.g. ``step 40/200  loss 2.3141  val 2.2810  tok/s 5,210  lr 2.9e-03
    mfu 8.43%  mem GiB 0.61  12s`` (MFU of the whole run; peak memory of rank 0, GiB)."""
    parts = [f"step {record['step']:>5}/{total_steps}"]
    for key, label, fmt in (
        ("loss", "loss", ".4f"),
        ("kl_loss", "kl", ".4f"),  # train.distill: the unweighted parts of the loss
        ("lm_loss", "lm", ".4f"),
        ("val_loss", "val", ".4f"),
        ("tokens_per_s", "tok/s", ",.0f"),
        ("lr", "lr", ".2e"),
        ("mfu", "mfu", ".2%"),
        ("peak_memory_gib", "mem GiB", ".2f"),
        ("epsilon", "eps", ".3g"),
    ):
        if key in record:
            value = record[key]
            parts.append(f"{label} {'nan' if value is None else format(value, fmt)}")
    if record.get("diverged"):
        parts.append("DIVERGED")
    parts.append(f"{elapsed_s:,.0f}s")
    return "  ".join(parts)


def build_summary(
    job: JobConfig,
    run_dir: Path,
    wall_time_s: float,
    privacy: PrivacyPlan | None = None,
    finetune: FinetunePlan | None = None,
) -> dict:
    """Summarise ``metrics.jsonl`` and ``events.jsonl`` of a finished run (with the epsilon spent
    and the privacy plan when ``privacy`` is given; trainable vs total parameters and the
    ``model.init_from`` source when ``finetune`` is given)."""
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
        "resumes": [
            {"step": e["resumed_from_step"], "world_size": e["world_size"]} for e in resumes
        ],
        "checkpoint": str(found[1]) if found else None,
        **(_privacy_summary(records, privacy) if privacy is not None else {}),
        **(finetune.to_dict() if finetune is not None else {}),
    }


def _privacy_summary(records: list[dict], privacy: PrivacyPlan) -> dict:
    spent = [r for r in records if "epsilon" in r]
    return {
        "epsilon": spent[-1]["epsilon"] if spent else 0.0,
        "delta": privacy.delta,
        "epsilon_per_eval": [{"step": r["step"], "epsilon": r["epsilon"]} for r in spent],
        "privacy": privacy.to_dict(),
    }


def _read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def print_header(plan: RunPlan, data_text: str) -> None:
    """Three lines before training: parameters (trainable of total) and attention, data, layout
    and run folder; then the ``model.init_from`` source and the privacy plan when set."""
    from mla.flops import count_parameters

    job, layout, run_dir = plan.job, plan.main_layout, plan.run_dir
    model = plan.model
    sizes = ", ".join(map(str, plan.world_sizes))
    tuned = plan.finetune
    params = (
        f"{count_parameters(model):,} parameters"
        if tuned is None
        else f"{tuned.total_parameters:,} parameters ({tuned.describe()})"
    )
    console.print(
        f"mla train {job.run.name}: {params}, "
        f"attention={model.attention} (window {model.local_window}, top-k {model.global_k})"
    )
    console.print(f"data: {data_text}")
    console.print(f"layout: {layout.describe()}  (world sizes: {sizes}); run folder: {run_dir}")
    if tuned is not None and tuned.init_from is not None:
        console.print(tuned.describe_source())
    if plan.privacy is not None:
        console.print(describe_privacy(plan.privacy, job.train.steps))
    if plan.distill is not None:
        console.print(plan.distill.describe())


def describe_privacy(plan: PrivacyPlan, steps: int) -> str:
    """One header line for a DP-SGD run."""
    budget = (
        f"target epsilon {plan.target_epsilon:g}"
        if plan.target_epsilon is not None
        else "no target epsilon"
    )
    return (
        f"privacy: DP-SGD, Poisson sampling q={plan.sample_rate:.3g} (N={plan.n_sequences:,}), noise_multiplier "
        f"{plan.noise_multiplier:.4g}, max_grad_norm {plan.max_grad_norm:g}, delta {plan.delta:.3g}, "
        f"{plan.accountant} accountant, {budget} over {steps} steps"
    )
