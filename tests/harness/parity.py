"""Loss parity of layouts: train the same model on the same data under any ``(dp, tp, pp)``.

A parallel layout is correct when it reproduces the single-process run (DeepSpeed's own
pipeline test compares against data parallel the same way). :func:`parity_worker` trains the
model for a few steps from fixed weights and data on one rank of a local gloo job
(:func:`tests.harness.local.run_local`), optionally resuming from or saving a consolidated
checkpoint, and returns the per-step losses. The tests compare them across layouts.

Run by hand (prints the per-step losses of each layout)::

    python -m tests.harness.parity 1,1,1 2,1,1 1,2,1 1,1,2
"""

from __future__ import annotations

import functools
import sys
import sysconfig
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from orchestrator.contract.distill import DistillPlan
from orchestrator.contract.layout import Layout, Recompute


def parity_layout(
    dp: int = 1,
    tp: int = 1,
    pp: int = 1,
    recompute: Recompute = "none",
    zero_stage: int = 1,
    micro_batch: int = 2,
    global_batch: int = 8,
) -> Layout:
    """The layout of a parity run: the given degrees, with the micro-batch and the global batch
    kept fixed across layouts (gradient accumulation makes up the difference)."""
    return Layout(
        dp=dp,
        tp=tp,
        pp=pp,
        zero_stage=zero_stage,
        micro_batch=micro_batch,
        grad_accum=global_batch // (dp * micro_batch),
        recompute=recompute,
    )


@dataclass(frozen=True)
class ParityRun:
    """One parity training run (plain data, crosses into the spawned processes).

    Attributes:
        layout: Degrees, ZeRO stage, micro-batch, accumulation and recomputation
            (:func:`parity_layout`; the default is the single-process reference).
        steps: Optimizer steps to reach (from 0, or from the resumed checkpoint's step).
        seq_len: Tokens per sequence.
        model: Overrides of the ``tiny`` preset.
        train: Overrides of the train section (lr, warm-up, clipping, ...).
        resume_from: Consolidated checkpoint folder to load first (or ``None``).
        save_at: Step after which to save a consolidated checkpoint into ``save_dir`` (the
            starting step: before the first step).
        save_dir: Folder for ``save_at`` (and for the final state when ``save_at == steps``).
        frozen: Canonical parameter names to freeze (:func:`mla.freeze.frozen_parameters`).
        init_from: ``(kind, folder)`` of weights to start from (``model.init_from``,
            :func:`workers.init_weights.load_init_weights`), or ``None``.
        distill: Distil from this teacher (``train.distill``, :mod:`workers.distill`), or
            ``None`` for the cross-entropy.
    """

    layout: Layout = field(default_factory=parity_layout)
    steps: int = 20
    seq_len: int = 64
    model: dict = field(default_factory=dict)
    train: dict = field(default_factory=dict)
    resume_from: str | None = None
    save_at: int | None = None
    save_dir: str | None = None
    frozen: frozenset[str] = frozenset()
    init_from: tuple[str, str] | None = None
    distill: DistillPlan | None = None

    def job(self):
        from orchestrator.config import JobConfig

        train = {
            "steps": 20,
            "micro_batch": self.layout.micro_batch,
            "global_batch": self.layout.global_batch,
            "lr": 3e-3,
            "warmup_steps": 5,
            "precision": "fp32",
            **self.train,
        }
        return JobConfig(
            model={"preset": "tiny", **self.model}, data={"seq_len": self.seq_len}, train=train
        )


def corpus_path() -> str:
    """A ~100 kB text that every Python installation has (``argparse.py``)."""
    return str(Path(sysconfig.get_paths()["stdlib"]) / "argparse.py")


def parity_worker(rank: int, world_size: int, run: ParityRun) -> dict:
    """Train ``run`` on this rank; returns ``{"losses": [...], "start": step, "frozen_with_grad":
    [names]}`` (losses the same on all ranks; the names are rank 0's frozen parameters holding a
    gradient, which should be none)."""
    from orchestrator.contract.deepspeed_config import build_deepspeed_config
    from workers.data import WindowBatches, load_corpus
    from workers.parallel.engine import build_engine
    from workers.schedule import train_lr

    layout, job = run.layout, run.job()
    layout.check_world_size(world_size)
    engine = build_engine(
        layout,
        build_deepspeed_config(job, layout),
        job.model_config_(),
        job.train.seed,
        job.train.weight_decay,
        frozen=run.frozen,
        wrap_loss=_distill_wrapper(run, job),
    )
    if run.init_from is not None:
        from workers.init_weights import load_init_weights

        load_init_weights(engine, *run.init_from)
    start = 0
    if run.resume_from:
        start = int(
            engine.load_checkpoint(str(Path(run.resume_from).parent), Path(run.resume_from).name)[
                1
            ]["step"]
        )
    batches = WindowBatches(load_corpus(corpus_path(), 0.05).train, run.seq_len, job.train.seed)
    dp_rank = layout.coords(rank)[1]
    losses = []
    if run.save_at == start:  # the weights before any step (e.g. to compare frozen ones)
        engine.save_checkpoint(run.save_dir, f"step_{start}", {"step": start})
    for step in range(start, run.steps):
        x, y = batches.rank_slice(step, layout.global_batch, dp_rank, layout.dp)
        engine.set_lr(train_lr(job.train, step + 1))
        losses.append(engine.train_batch(x, y))
        if run.save_at == step + 1:
            engine.save_checkpoint(run.save_dir, f"step_{step + 1}", {"step": step + 1})
    frozen_with_grad = [  # a frozen parameter never gets a gradient (nor its all-reduce)
        n
        for n, p in engine.canonical_parameters().items()
        if n in run.frozen and p.grad is not None
    ]
    return {"losses": losses, "start": start, "frozen_with_grad": frozen_with_grad}


def _distill_wrapper(run: ParityRun, job):
    if run.distill is None:
        return None
    import torch

    from workers.distill import DistillLoss

    vocab = job.model_config_().vocab_size
    return lambda base: DistillLoss(base, run.distill, vocab, torch.device("cpu"))


def run_parity(run: ParityRun) -> dict:
    """Run ``run`` on ``dp * tp * pp`` local processes; returns rank 0's result."""
    from tests.harness.local import run_local

    return run_local(parity_worker, run.layout.world_size, run)[0]


@functools.lru_cache(maxsize=4)
def reference_run(steps: int = 20) -> dict:
    """The single-process ``(1, 1, 1)`` run: ``{"losses": [...], "params": {name: tensor}}``
    (final parameters), cached per process so that several test files share it."""
    from workers.parallel.reshard import read_consolidated

    with tempfile.TemporaryDirectory() as tmp:
        out = run_parity(ParityRun(steps=steps, save_at=steps, save_dir=tmp))
        _, tensors = read_consolidated(Path(tmp) / f"step_{steps}")
    return {"losses": out["losses"], "params": tensors["param"]}


def main(argv: list[str]) -> None:
    for text in argv or ["1,1,1"]:
        dp, tp, pp = (int(v) for v in text.split(","))
        losses = run_parity(ParityRun(parity_layout(dp, tp, pp)))["losses"]
        print(f"(dp, tp, pp) = ({dp}, {tp}, {pp}):", " ".join(f"{v:.6f}" for v in losses))


if __name__ == "__main__":
    main(sys.argv[1:])
