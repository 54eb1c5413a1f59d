"""The training loop that Ray Train runs on every worker.

Order of work on each worker (torchtitan-style named steps):
1. pick the plan for the actual world size (elastic runs may get fewer or more workers);
2. ``init_distributed`` (DeepSpeed over the process group Ray Train created: gloo/nccl);
3. ``build_engine`` (:mod:`workers.parallel`): process groups for the layout, the model's layers
   for this rank (tensor-parallel shards; only this stage's layers when ``pp > 1``), then
   ``deepspeed.initialize`` (ZeRO over the data-parallel group; ``PipelineEngine`` for pipelines);
4. resume from the latest complete checkpoint of the run, if any -- checkpoints are
   layout-independent, so a run resized by an elastic restart continues at the same step with
   the same global batch under its new layout;
5. loop: one optimizer step per global batch (``grad_accum`` micro-batches); log, evaluate,
   checkpoint.

Rank 0 appends one JSON object per logged step to ``RUN_DIR/metrics.jsonl`` (step, loss, lr,
tokens_per_s, elapsed_s, and val_loss when evaluated) and start/resume events to
``RUN_DIR/events.jsonl``. Every rank writes ``RUN_DIR/workers/rank_N.json`` (pid, host) so that
operators (and the failure tests) can find its process.
"""

from __future__ import annotations

import json
import math
import os
import socket
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from orchestrator.contract.checkpoints import latest_checkpoint, saved_layout
from orchestrator.contract.io import atomic_write, write_json_atomic
from orchestrator.contract.layout import Layout, resume_problem
from orchestrator.contract.run_plan import RunPlan
from workers.checkpoint import load_checkpoint, save_checkpoint
from workers.data import WindowBatches, load_corpus
from workers.parallel.engine import build_engine


def train_loop_per_worker(config: dict) -> None:
    """Ray Train entry point (``TorchTrainer(train_loop_per_worker=...,
    train_loop_config={"plan": RunPlan})``)."""
    import ray.train

    plan: RunPlan = config["plan"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    layout, ds_config = plan.for_world(world)
    cluster = plan.job.cluster
    torch.set_num_threads(int(cluster.torch_threads or max(1, int(cluster.cpus_per_worker))))
    _record_worker(plan.run_dir, rank, world)
    init_distributed(cluster.use_gpu)
    Trainer(plan, layout, ds_config, rank, world).run()


def init_distributed(use_gpu: bool) -> None:
    """Let DeepSpeed adopt the process group that Ray Train created.

    On CPU, DeepSpeed would JIT-compile its shared-memory all-reduce op (2-3 minutes of gcc on
    first use); we skip it and let gloo do every collective, unless ``MLA_DS_SHM_COMM=1``.
    """
    import importlib

    import deepspeed

    if not use_gpu and os.environ.get("MLA_DS_SHM_COMM") != "1":
        # ``import deepspeed.comm.torch as m`` would bind the torch library (the package's
        # ``torch`` attribute), so fetch the submodule itself.
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    deepspeed.init_distributed(dist_backend="nccl" if use_gpu else "gloo", auto_mpi_discovery=False)


class Trainer:
    """One worker's training run under a fixed ``(dp, tp, pp)`` layout."""

    def __init__(self, plan: RunPlan, layout: Layout, ds_config: dict, rank: int, world: int):
        self.plan, self.layout, self.rank, self.world = plan, layout, rank, world
        self.job = plan.job
        self.train_cfg, self.data_cfg = self.job.train, self.job.data
        self.run_dir = plan.run_dir
        self.model_cfg = plan.model
        self.device = torch.device("cuda", torch.cuda.current_device()) if self.job.cluster.use_gpu \
            else torch.device("cpu")
        self.engine = build_engine(layout, ds_config, self.model_cfg, self.train_cfg.seed,
                                   self.train_cfg.weight_decay, self.device)
        corpus = load_corpus(self.data_cfg.path, self.data_cfg.val_fraction)
        seq = self.data_cfg.seq_len
        self.train_batches = WindowBatches(corpus.train, seq, self.train_cfg.seed)
        self.val_batches = WindowBatches(corpus.val, seq, self.train_cfg.seed + 1)
        self.dp_rank = layout.coords(rank)[1]
        self._last: dict = {}

    # ------------------------------------------------------------------ steps
    def run(self) -> None:
        start = self.resume()
        steps = self.train_cfg.steps
        log_every, eval_every = self.train_cfg.log_every, self.train_cfg.eval_every
        ckpt_every = self.job.checkpoint.every
        if start == 0:
            self.log({"step": 0, "val_loss": self.evaluate(), "elapsed_s": 0.0})
            self.report(0)
        t0, tokens, window_loss = time.perf_counter(), 0, []
        for step in range(start + 1, steps + 1):
            window_loss.append(self.train_step(step - 1))
            tokens += self.layout.global_batch * self.data_cfg.seq_len
            last = step == steps
            evaluate = step % eval_every == 0 or last
            if step % log_every == 0 or evaluate:
                elapsed = time.perf_counter() - t0
                record = {"step": step, "loss": float(np.mean(window_loss)), "lr": self.lr(),
                          "tokens_per_s": tokens / elapsed, "step_time_s": elapsed / len(window_loss)}
                if evaluate:
                    record["val_loss"] = self.evaluate()
                self.log(record)
                t0, tokens, window_loss = time.perf_counter(), 0, []
            save = step % ckpt_every == 0 or last
            if save:
                self.checkpoint(step)
            if save or evaluate:
                self.report(step)

    def train_step(self, step_index: int) -> float:
        """One optimizer step (all micro-batches); returns the loss averaged over ranks."""
        x, y = self.train_batches.rank_slice(step_index, self.layout.global_batch, self.dp_rank, self.layout.dp)
        return self.engine.train_batch(x, y)

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean validation loss over the same held-out sequences for every layout."""
        gb = self.layout.global_batch
        n_batches = max(1, min(self.train_cfg.eval_batches, self.val_batches.n_windows // gb))
        total = 0.0
        for b in range(n_batches):
            total += self.engine.eval_batch(*self.val_batches.rank_slice(b, gb, self.dp_rank, self.layout.dp))
        return total / n_batches

    def resume(self) -> int:
        """Load the latest complete checkpoint; returns the step to continue from (0 if none)."""
        found = latest_checkpoint(self.run_dir) if self.job.checkpoint.resume else None
        step, saved = 0, None
        if found is not None:
            step, path = found
            saved = saved_layout(path)
            problem = resume_problem(saved, self.layout)
            if problem:
                raise RuntimeError(f"checkpoint {path} was written under {saved.describe() if saved else '?'} "
                                   f"and cannot load under {self.layout.describe()}: {problem}")
            load_checkpoint(self.engine, path)
        if self.rank == 0:
            self._trim_metrics(step)
            self._event({"event": "start", "world_size": self.world, "layout": self.layout.to_dict(),
                         "resumed_from_step": step if found else None,
                         "checkpoint": str(found[1]) if found else None,
                         "checkpoint_layout": saved.to_dict() if saved else None})
        return step

    def checkpoint(self, step: int) -> Path:
        """Atomic DeepSpeed checkpoint of all ranks; returns its folder."""
        meta = {"world_size": self.world, "layout": self.layout.to_dict(), "model": self.model_cfg.to_dict()}
        return save_checkpoint(self.engine, self.run_dir, step, meta, self.rank,
                               self.job.checkpoint.keep, dist.barrier)

    def report(self, step: int) -> None:
        """``ray.train.report`` the latest metrics (every rank: it is a collective).

        No checkpoint is attached: :mod:`workers.checkpoint` is the one owner of checkpoints
        (see :func:`orchestrator.launcher.build_trainer` for why), so Ray Train only carries
        metrics (to the progress of Tune and ``Result.metrics``).
        """
        import ray.train

        ray.train.report({"step": step, **self._last_metrics()})

    # ------------------------------------------------------------------ helpers
    def lr(self) -> float:
        return float(self.engine.get_lr()[0])

    def log(self, record: dict) -> None:
        record = {k: (round(v, 6) if isinstance(v, float) and math.isfinite(v) else v) for k, v in record.items()}
        self._last = {**self._last, **record}
        if self.rank != 0:
            return
        with open(self.run_dir / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(record) + "\n")

    def _last_metrics(self) -> dict:
        return {k: v for k, v in self._last.items() if k in ("loss", "val_loss", "tokens_per_s")}

    def _event(self, record: dict) -> None:
        with open(self.run_dir / "events.jsonl", "a") as fh:
            fh.write(json.dumps({"time": time.time(), **record}) + "\n")

    def _trim_metrics(self, step: int) -> None:
        """Drop records past ``step`` left by an attempt that died after its last checkpoint."""
        path = self.run_dir / "metrics.jsonl"
        if not path.exists():
            return
        keep = [line for line in path.read_text().splitlines()
                if line.strip() and json.loads(line)["step"] <= step]
        atomic_write(path, "".join(line + "\n" for line in keep))


def _record_worker(run_dir: Path, rank: int, world: int) -> None:
    folder = run_dir / "workers"
    folder.mkdir(parents=True, exist_ok=True)
    write_json_atomic(folder / f"rank_{rank}.json",
                      {"rank": rank, "world_size": world, "pid": os.getpid(), "host": socket.gethostname()})
