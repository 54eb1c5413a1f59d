"""``mla viz run RUN_DIR``: plots of a run from its ``metrics.jsonl`` and ``events.jsonl``.

Three PNGs (matplotlib, Agg backend, imported inside the functions so the CLI starts fast):

* ``loss.png``: train and validation loss against step and against tokens (log y), with a
  dashed vertical line at every resume and a dotted one at every layout change;
* ``throughput.png``: tokens/s and step time against step;
* ``lr.png``: the learning rate against step;

and ``mla viz compare RUN...`` overlays the validation loss of several runs against tokens.

Tokens are ``step x train.global_batch x data.seq_len`` from ``RUN_DIR/job.json`` (the global
batch is the same for every layout, so runs of different layouts line up).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.contract.errors import ConfigError


@dataclass(frozen=True)
class RunRecords:
    """What a run left behind.

    Attributes:
        records: ``metrics.jsonl`` objects, in order.
        resumes: Steps that attempts resumed from.
        layout_changes: Steps at which an attempt started under another layout than the last.
        tokens_per_step: ``train.global_batch * data.seq_len``.
    """

    records: list[dict]
    resumes: list[int]
    layout_changes: list[int]
    tokens_per_step: int

    def series(self, key: str) -> tuple[list[int], list[float]]:
        """``(steps, values)`` of the records that hold a finite ``key``."""
        pairs = [(r["step"], r[key]) for r in self.records if r.get(key) is not None]
        return [s for s, _ in pairs], [float(v) for _, v in pairs]


def _jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_run(run_dir: Path) -> RunRecords:
    """Read ``RUN_DIR``.

    Raises:
        ConfigError: no ``metrics.jsonl`` or ``job.json`` (not a run folder), with the fix.
    """
    if not (run_dir / "metrics.jsonl").is_file() or not (run_dir / "job.json").is_file():
        raise ConfigError(
            f"{run_dir} holds no metrics.jsonl and job.json; pass a run folder that `mla train` "
            "wrote, e.g. runs/tiny"
        )
    job = json.loads((run_dir / "job.json").read_text())
    starts = [e for e in _jsonl(run_dir / "events.jsonl") if e.get("event") == "start"]
    resumes = [e["resumed_from_step"] for e in starts if e.get("resumed_from_step") is not None]
    changes, previous = [], None
    for event in starts:
        if previous is not None and event.get("layout") != previous:
            changes.append(event.get("resumed_from_step") or 0)
        previous = event.get("layout")
    return RunRecords(
        _jsonl(run_dir / "metrics.jsonl"),
        resumes,
        changes,
        int(job["train"]["global_batch"]) * int(job["data"]["seq_len"]),
    )


def _markers(ax: Any, run: RunRecords, scale: int = 1) -> None:
    for i, step in enumerate(run.resumes):
        ax.axvline(step * scale, color="grey", ls="--", lw=1, label="resume" if i == 0 else None)
    for i, step in enumerate(run.layout_changes):
        ax.axvline(
            step * scale, color="purple", ls=":", lw=1, label="layout change" if i == 0 else None
        )


def loss_figure(run: RunRecords):
    """Train/val loss against step (left) and tokens (right)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4), dpi=100)
    for ax, scale, xlabel in zip(
        fig.subplots(1, 2), (1, run.tokens_per_step), ("step", "tokens"), strict=True
    ):
        for key, label in (("loss", "train loss"), ("val_loss", "val loss")):
            steps, values = run.series(key)
            ax.plot(
                [s * scale for s in steps],
                values,
                marker="o" if key == "val_loss" else None,
                ms=3,
                label=label,
            )
        _markers(ax, run, scale)
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("loss (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("loss")
    fig.tight_layout()
    return fig


def throughput_figure(run: RunRecords):
    """Tokens/s (left) and step time (right) against step."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4), dpi=100)
    for ax, key, ylabel in zip(
        fig.subplots(1, 2),
        ("tokens_per_s", "step_time_s"),
        ("tokens/s", "step time (s)"),
        strict=True,
    ):
        ax.plot(*run.series(key), label=ylabel)
        _markers(ax, run)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    fig.suptitle("throughput")
    fig.tight_layout()
    return fig


def lr_figure(run: RunRecords):
    """The learning rate against step."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), dpi=100)
    ax = fig.subplots()
    ax.plot(*run.series("lr"), label="lr")
    _markers(ax, run)
    ax.set_xlabel("step")
    ax.set_ylabel("learning rate")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_run(run_dir: Path, out_dir: Path) -> dict[str, Path]:
    """Write ``loss.png``, ``throughput.png`` and ``lr.png`` of ``run_dir`` into ``out_dir``.

    Raises:
        ConfigError: ``run_dir`` is not a run folder, or holds no logged step yet.
    """
    run = read_run(run_dir)
    if not run.series("loss")[0]:
        raise ConfigError(f"{run_dir}/metrics.jsonl holds no training step yet; plot it later")
    builders = (("loss", loss_figure), ("throughput", throughput_figure), ("lr", lr_figure))
    return {name: save_png(build(run), out_dir / f"{name}.png") for name, build in builders}


def compare_figure(runs: dict[str, RunRecords]):
    """Validation loss against tokens of several runs on one chart (runs of different layouts
    or batch sizes line up on tokens, not on steps)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5), dpi=100)
    ax = fig.subplots()
    for name, run in runs.items():
        steps, values = run.series("val_loss")
        ax.plot([s * run.tokens_per_step for s in steps], values, marker="o", ms=3, label=name)
    ax.set_yscale("log")
    ax.set_xlabel("tokens")
    ax.set_ylabel("validation loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def plot_compare(run_dirs: list[Path], out: Path) -> Path:
    """Write the :func:`compare_figure` of ``run_dirs`` (labelled by folder name) to ``out``.

    Raises:
        ConfigError: fewer than one run, or a folder that is not a run.
    """
    if not run_dirs:
        raise ConfigError("give at least one run folder, e.g. mla viz compare runs/a runs/b")
    fig = compare_figure({str(d): read_run(d) for d in run_dirs})
    return save_png(fig, out)


def save_png(fig: Any, out: Path) -> Path:
    """Render ``fig`` to the PNG ``out`` atomically (a temporary file, then a rename)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    fig.savefig(tmp, format="png")
    tmp.replace(out)
    return out
