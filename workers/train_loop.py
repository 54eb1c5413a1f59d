"""The training loop that Ray Train runs on every worker.

Order of work on each worker (torchtitan-style named steps):
1. pick the plan for the actual world size (elastic runs may get fewer or more workers);
2. ``init_distributed`` (DeepSpeed over the process group Ray Train created: gloo/nccl);
3. ``build_model`` from the seed, then ``build_engine`` (``deepspeed.initialize``);
4. resume from the latest complete checkpoint of the run, if any;
5. loop: micro-batches -> ``engine.backward`` / ``engine.step``; log, evaluate, checkpoint.

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
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from mla.config import ModelConfig
from workers.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint, write_json_atomic
from workers.data import WindowBatches, load_corpus
from workers.layout import Layout


@dataclass(frozen=True)
class WorkerPlan:
    """Everything a worker needs, as plain data (built by the controller).

    Attributes:
        job: The validated job config as a plain dict (``JobConfig.model_dump()``).
        model: Model shape as a plain dict (``ModelConfig.to_dict()``).
        run_dir: Absolute RUN_DIR shared by all workers.
        plans: World size (as str, JSON-friendly) -> ``{"layout": Layout dict, "deepspeed": config}``.
    """

    job: dict
    model: dict
    run_dir: str
    plans: dict


class LMWithLoss(torch.nn.Module):
    """Wraps a language model so that ``forward(inputs, targets)`` returns the mean token loss.

    Args:
        model: Maps token ids ``(batch, seq)`` to logits ``(batch, seq, vocab)``.
    """

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = self.model(inputs)
        return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1))


def train_loop_per_worker(config: dict) -> None:
    """Ray Train entry point (``TorchTrainer(train_loop_per_worker=...)``)."""
    import ray.train

    plan = WorkerPlan(**config)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    entry = plan.plans.get(str(world))
    if entry is None:
        raise RuntimeError(f"no layout was planned for world_size={world}; planned: {sorted(plan.plans)}")
    layout = Layout(**entry["layout"])
    layout.check_world_size(world)
    cluster = plan.job["cluster"]
    torch.set_num_threads(int(cluster.get("torch_threads") or max(1, int(cluster["cpus_per_worker"]))))
    _record_worker(plan.run_dir, rank, world)
    init_distributed(cluster["use_gpu"])
    Trainer(plan, layout, entry["deepspeed"], rank, world).run()


def init_distributed(use_gpu: bool) -> None:
    """Let DeepSpeed adopt the process group that Ray Train created.

    On CPU, DeepSpeed would JIT-compile its shared-memory all-reduce op (2-3 minutes of gcc on
    first use); we skip it and let gloo do every collective, unless ``MLA_DS_SHM_COMM=1``.
    """
    import deepspeed
    import deepspeed.comm.torch as ds_torch_comm

    if not use_gpu and os.environ.get("MLA_DS_SHM_COMM") != "1":
        ds_torch_comm.build_shm_op = lambda: None
    deepspeed.init_distributed(dist_backend="nccl" if use_gpu else "gloo", auto_mpi_discovery=False)


def build_model(model_cfg: ModelConfig, seed: int) -> torch.nn.Module:
    """The MLA transformer with deterministic weights for ``seed``."""
    from mla.model import MLATransformer

    torch.manual_seed(seed)
    return MLATransformer(model_cfg)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay on matrices (dim >= 2), none on norms, gates' biases and vectors."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_engine(model: torch.nn.Module, ds_config: dict, weight_decay: float):
    """``deepspeed.initialize`` on ``LMWithLoss(model)``; returns the engine."""
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(model=LMWithLoss(model),
                                           model_parameters=param_groups(model, weight_decay),
                                           config=ds_config)
    return engine


class Trainer:
    """One worker's training run under a fixed layout (data parallel with ZeRO)."""

    def __init__(self, plan: WorkerPlan, layout: Layout, ds_config: dict, rank: int, world: int):
        self.plan, self.layout, self.rank, self.world = plan, layout, rank, world
        self.job = plan.job
        self.train_cfg, self.data_cfg = self.job["train"], self.job["data"]
        self.run_dir = Path(plan.run_dir)
        self.model_cfg = ModelConfig(**plan.model)
        self.device = torch.device("cuda", torch.cuda.current_device()) if self.job["cluster"]["use_gpu"] \
            else torch.device("cpu")
        self.engine = build_engine(build_model(self.model_cfg, self.train_cfg["seed"]), ds_config,
                                   self.train_cfg["weight_decay"])
        corpus = load_corpus(self.data_cfg["path"], self.data_cfg["val_fraction"])
        seq = self.data_cfg["seq_len"]
        self.train_batches = WindowBatches(corpus.train, seq, self.train_cfg["seed"])
        self.val_batches = WindowBatches(corpus.val, seq, self.train_cfg["seed"] + 1)
        self.dp_rank = layout.coords(rank)[1]

    # ------------------------------------------------------------------ steps
    def run(self) -> None:
        start = self.resume()
        steps = self.train_cfg["steps"]
        log_every, eval_every = self.train_cfg["log_every"], self.train_cfg["eval_every"]
        ckpt_every = self.job["checkpoint"]["every"]
        if start == 0:
            self.log({"step": 0, "val_loss": self.evaluate(), "elapsed_s": 0.0})
        t0, tokens, window_loss = time.perf_counter(), 0, []
        for step in range(start + 1, steps + 1):
            window_loss.append(self.train_step(step - 1))
            tokens += self.layout.global_batch * self.data_cfg["seq_len"]
            last = step == steps
            if step % log_every == 0 or step % eval_every == 0 or last:
                elapsed = time.perf_counter() - t0
                record = {"step": step, "loss": float(np.mean(window_loss)), "lr": self.lr(),
                          "tokens_per_s": tokens / elapsed, "step_time_s": elapsed / len(window_loss)}
                if step % eval_every == 0 or last:
                    record["val_loss"] = self.evaluate()
                self.log(record)
                t0, tokens, window_loss = time.perf_counter(), 0, []
            if step % ckpt_every == 0 or last:
                self.checkpoint(step, last)

    def train_step(self, step_index: int) -> float:
        """One optimizer step (all micro-batches); returns the loss averaged over ranks."""
        x, y = self.train_batches.rank_slice(step_index, self.layout.global_batch, self.dp_rank, self.layout.dp)
        mb = self.layout.micro_batch
        total = torch.zeros((), dtype=torch.float64)
        for i in range(self.layout.grad_accum):
            xb, yb = self._to_device(x[i * mb:(i + 1) * mb], y[i * mb:(i + 1) * mb])
            loss = self.engine(xb, yb)
            self.engine.backward(loss)
            self.engine.step()
            total += loss.detach().double().cpu()
        return self._mean_over_ranks(total / self.layout.grad_accum)

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean validation loss over the same held-out sequences for every layout."""
        gb = self.layout.global_batch
        n_batches = max(1, min(self.train_cfg["eval_batches"], self.val_batches.n_windows // gb))
        self.engine.eval()
        total = torch.zeros((), dtype=torch.float64)
        for b in range(n_batches):
            x, y = self.val_batches.rank_slice(b, gb, self.dp_rank, self.layout.dp)
            for i in range(0, len(x), self.layout.micro_batch):
                xb, yb = self._to_device(x[i:i + self.layout.micro_batch], y[i:i + self.layout.micro_batch])
                total += self.engine(xb, yb).double().cpu() * len(xb)
        self.engine.train()
        return self._mean_over_ranks(total / (n_batches * (gb // self.layout.dp)))

    def resume(self) -> int:
        """Load the latest complete checkpoint; returns the step to continue from (0 if none)."""
        found = latest_checkpoint(self.run_dir) if self.job["checkpoint"]["resume"] else None
        step = 0
        if found is not None:
            step, path = found
            load_checkpoint(self.engine, path)
        if self.rank == 0:
            self._trim_metrics(step)
            self._event({"event": "start", "world_size": self.world, "layout": self.layout.to_dict(),
                         "resumed_from_step": step if found else None,
                         "checkpoint": str(found[1]) if found else None})
        return step

    def checkpoint(self, step: int, last: bool) -> None:
        """Atomic DeepSpeed checkpoint, then a Ray Train report that references it."""
        import ray.train

        meta = {"world_size": self.world, "layout": self.layout.to_dict(), "model": self.plan.model}
        path = save_checkpoint(self.engine, self.run_dir, step, meta, self.rank,
                               self.job["checkpoint"]["keep"], dist.barrier)
        metrics = {"step": step, **self._last_metrics()}
        if self.rank == 0:
            with tempfile.TemporaryDirectory() as tmp:
                write_json_atomic(Path(tmp) / "mla_checkpoint.json", {"step": step, "path": str(path)})
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        else:
            ray.train.report(metrics)

    # ------------------------------------------------------------------ helpers
    def lr(self) -> float:
        return float(self.engine.get_lr()[0])

    def _to_device(self, x: np.ndarray, y: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.from_numpy(x).to(self.device), torch.from_numpy(y).to(self.device)

    def _mean_over_ranks(self, value: torch.Tensor) -> float:
        value = value.to(self.device)
        dist.all_reduce(value)
        return float(value) / self.world

    def log(self, record: dict) -> None:
        if self.rank != 0:
            return
        record = {k: (round(v, 6) if isinstance(v, float) and math.isfinite(v) else v) for k, v in record.items()}
        self._last = record
        with open(self.run_dir / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(record) + "\n")

    def _last_metrics(self) -> dict:
        last = getattr(self, "_last", {})
        return {k: v for k, v in last.items() if k in ("loss", "val_loss", "tokens_per_s")}

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
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        os.replace(tmp, path)


def _record_worker(run_dir: str, rank: int, world: int) -> None:
    folder = Path(run_dir) / "workers"
    folder.mkdir(parents=True, exist_ok=True)
    write_json_atomic(folder / f"rank_{rank}.json",
                      {"rank": rank, "world_size": world, "pid": os.getpid(), "host": socket.gethostname()})
