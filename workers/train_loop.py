"""The training loop that Ray Train runs on every worker.

Order of work on each worker (torchtitan-style named steps):
1. pick the plan for the actual world size (elastic runs may get fewer or more workers);
2. ``init_distributed`` (DeepSpeed over the process group Ray Train created: gloo/nccl);
3. ``build_engine`` (:mod:`workers.parallel`): process groups for the layout, the model's layers
   for this rank (tensor-parallel shards; only this stage's layers when ``pp > 1``), then
   ``deepspeed.initialize`` (ZeRO over the data-parallel group; ``PipelineEngine`` for pipelines);
4. resume from the latest complete checkpoint of the run, if any -- checkpoints are
   layout-independent, so a run resized by an elastic restart continues at the same step with
   the same global batch under its new layout; a run without one starts at step 0 from the
   weights of ``model.init_from`` when set (weights only: :mod:`workers.init_weights`) -- the
   run's own checkpoint wins, as in Hugging Face Trainer and torchtitan. Parameters frozen by
   ``train.freeze`` / ``train.trainable_last_layers`` are frozen before the optimizer is built
   (:func:`workers.parallel.pipeline.apply_freeze`);
5. loop: one optimizer step per global batch (``grad_accum`` micro-batches) at the lr of
   :mod:`workers.schedule`, with dropout seeded per step (:mod:`workers.rng`); the divergence
   guard (:mod:`workers.guard`) checks every step; log, evaluate, checkpoint (never from
   non-finite parameters or during a bad streak). A diverged run writes ``RUN_DIR/failure.json``
   and ends normally (Ray Train would retry a deterministic failure); the controller fails it.

Rank 0 appends one strict-JSON object per logged step to ``RUN_DIR/metrics.jsonl`` (step, loss,
lr the step used, tokens_per_s, step_time_s, mfu, peak_memory_gib (rank 0's), grad_norm,
elapsed_s, and val_loss when evaluated, with the epsilon spent under ``train.privacy``, and
``kl_loss`` / ``lm_loss`` (the unweighted parts of the loss) under ``train.distill``;
non-finite values as ``null`` listed under ``nonfinite``) and start/resume events to
``RUN_DIR/events.jsonl``. Every rank writes ``RUN_DIR/workers/rank_N.json`` (pid, host) so that
operators (and the failure tests) can find its process.

Observability (on top of those files): every rank sets its Prometheus metrics at each logging
interval (:mod:`workers.metrics`, ``ray_mla_*``), and rank 0 writes TensorBoard events to
``RUN_DIR/tb`` (:mod:`workers.tensorboard`, ``train.tensorboard``).
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

from mla.flops import training_flops_per_token
from mla.tokenizer import TOKENIZER_FILE
from orchestrator.contract.checkpoints import (
    FAILURE_FILE,
    find_resumable,
    remove_stale_temporaries,
    saved_layout,
    set_aside,
)
from orchestrator.contract.io import atomic_write, write_json_atomic
from orchestrator.contract.layout import Layout, resume_problem
from orchestrator.contract.run_plan import RunPlan
from orchestrator.contract.strict_json import strict_record
from workers.attention_probe import AttentionProbe
from workers.checkpoint import load_checkpoint, save_checkpoint
from workers.data import WindowBatches, load_corpus
from workers.gate_probe import GateProbe
from workers.guard import Diverged, DivergenceGuard
from workers.metrics import TrainMetrics, mfu, peak_memory_bytes
from workers.parallel.engine import build_engine
from workers.privacy.session import build_private_training
from workers.rng import seed_step
from workers.schedule import train_lr
from workers.tensorboard import RunBoard, open_board
from workers.tokenizer_spec import job_tokenizer


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
    trainer = Trainer(plan, layout, ds_config, rank, world)
    try:
        trainer.run()
    finally:
        trainer.metrics.close()


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
        self.device = (
            torch.device("cuda", torch.cuda.current_device())
            if self.job.cluster.use_gpu
            else torch.device("cpu")
        )
        self.engine = build_engine(
            layout,
            ds_config,
            self.model_cfg,
            self.train_cfg.seed,
            self.train_cfg.weight_decay,
            self.device,
            frozen=plan.finetune.frozen if plan.finetune else frozenset(),
            wrap_loss=self._distill_loss(),
        )
        self.tokenizer = job_tokenizer(self.job)
        corpus = load_corpus(self.data_cfg.path, self.data_cfg.val_fraction, self.tokenizer)
        seq = self.data_cfg.seq_len
        self.train_batches = WindowBatches(corpus.train, seq, self.train_cfg.seed)
        self.val_batches = WindowBatches(corpus.val, seq, self.train_cfg.seed + 1)
        self.dp_rank = layout.coords(rank)[1]
        self.private = build_private_training(
            plan.privacy, self.engine, self.train_batches, self.train_cfg.seed
        )
        self.guard = DivergenceGuard(self.train_cfg.max_bad_steps)
        self._last: dict = {}
        self.metrics = TrainMetrics(plan.run_dir.name, rank, layout)
        self.flops_per_token = training_flops_per_token(self.model_cfg, seq)
        self.board: RunBoard | None = None
        self._gate_means: dict[int, list[float]] = {}
        self._attention_maps: dict = {}
        self._data_wait_s = 0.0  # seconds fetching batches since the last logging interval

    def _distill_loss(self):
        """``base_loss -> DistillLoss`` under ``train.distill`` (:mod:`workers.distill`), else
        ``None``."""
        if self.plan.distill is None:
            return None
        from workers.distill import DistillLoss

        plan, vocab, device = self.plan.distill, self.model_cfg.vocab_size, self.device
        return lambda base: DistillLoss(base, plan, vocab, device)

    # ------------------------------------------------------------------ steps
    def run(self) -> None:
        start = self.resume()
        if self.rank == 0 and self.train_cfg.tensorboard:
            self.board = open_board(self.run_dir, start)
        if self.board is not None:
            self.board.start(start, self.job.model_dump(mode="json"), self.layout.describe())
        try:
            self._run_from(start)
        finally:
            if self.board is not None:
                self.board.close()

    def _run_from(self, start: int) -> None:
        steps = self.train_cfg.steps
        log_every, eval_every = self.train_cfg.log_every, self.train_cfg.eval_every
        ckpt_every = self.job.checkpoint.every
        if start == 0:
            self.log(
                {
                    "step": 0,
                    "val_loss": self.evaluate(),
                    "elapsed_s": 0.0,
                    **self._privacy_metrics(),
                }
            )
            self.report(0)
        t0, tokens, window_loss, step_times = time.perf_counter(), 0, [], []
        for step in range(start + 1, steps + 1):
            lr = train_lr(self.train_cfg, step)
            self.engine.set_lr(lr)
            skipped = self.engine.skipped_steps()
            t_step = time.perf_counter()
            window_loss.append(self.train_step(step - 1))
            step_times.append(time.perf_counter() - t_step)
            tokens += self.layout.global_batch * self.data_cfg.seq_len
            last = step == steps
            evaluate = step % eval_every == 0 or last
            save = step % ckpt_every == 0 or last
            try:
                save = self.check_step(
                    step, window_loss[-1], self.engine.skipped_steps() - skipped, save
                )
            except Diverged as exc:
                self.log({"step": step, "loss": window_loss[-1], "lr": lr, "diverged": True})
                self.fail(exc)
                return
            if step % log_every == 0 or evaluate:
                elapsed = time.perf_counter() - t0
                record = {
                    "step": step,
                    "loss": float(np.mean(window_loss)),
                    "lr": lr,
                    "tokens_per_s": tokens / elapsed,
                    "step_time_s": elapsed / len(window_loss),
                }
                record.update(self.export_interval(record, step_times, tokens))
                if self.engine.distill:  # collective: every rank logs at the same steps
                    record.update(self.engine.loss_fn.take_metrics(self.device))
                if evaluate:
                    record.update(val_loss=self.evaluate(), **self._privacy_metrics())
                self.log(record)
                t0, tokens, window_loss, step_times = time.perf_counter(), 0, [], []
            if save:
                self.checkpoint(step)
            if save or evaluate:
                self.report(step)

    def export_interval(self, record: dict, step_times: list[float], tokens: int) -> dict:
        """Set this interval's Prometheus metrics (:mod:`workers.metrics`); returns the values
        the record gains: ``mfu`` (0-1), ``peak_memory_gib`` (this rank) and ``grad_norm``."""
        memory = peak_memory_bytes(self.job.cluster.use_gpu)
        utilisation = mfu(
            self.flops_per_token, record["tokens_per_s"], self.plan.peak_flops, self.world
        )
        grad_norm = self.engine.grad_norm()
        self.metrics.interval(
            {**record, "grad_norm": grad_norm},
            step_times,
            tokens,
            memory,
            utilisation,
            self._data_wait_s,
        )
        self._data_wait_s = 0.0
        extra: dict = {"peak_memory_gib": memory / 2**30}
        if math.isfinite(utilisation):  # nan when the catalogue has no peak for the device
            extra["mfu"] = utilisation
        if grad_norm is not None and math.isfinite(grad_norm):
            extra["grad_norm"] = grad_norm
        return extra

    def check_step(self, step: int, loss: float, skipped: int, save: bool) -> bool:
        """Feed the divergence guard; returns whether the checkpoint due at ``step`` may be written.

        Raises:
            Diverged: too many bad steps in a row, or non-finite parameters at a checkpoint.
        """
        self.guard.observe(step, loss, self.engine.grad_norm(), skipped)
        if save and not self.engine.params_finite():
            raise DivergenceGuard.params_diverged(step)
        if save and self.guard.bad:  # parameters of a bad streak are suspect: keep the older ones
            if self.rank == 0:
                self._event(
                    {
                        "event": "checkpoint_skipped",
                        "step": step,
                        "reason": f"{self.guard.bad} bad steps in a row",
                    }
                )
            return False
        return save

    def fail(self, exc: Diverged) -> None:
        """Record why the run stopped (rank 0) and report it; the worker then returns normally."""
        if self.rank == 0:
            write_json_atomic(
                self.run_dir / FAILURE_FILE,
                {"error": "diverged", "step": exc.step, "message": str(exc)},
            )
        self.report(exc.step)

    def train_step(self, step_index: int) -> float:
        """One optimizer step (all micro-batches); returns the loss averaged over ranks."""
        if self.private is not None:  # DP-SGD on a Poisson sample (workers.privacy)
            return self.private.train_step(step_index)
        started = time.perf_counter()
        x, y = self.train_batches.rank_slice(
            step_index, self.layout.global_batch, self.dp_rank, self.layout.dp
        )
        self._data_wait_s += time.perf_counter() - started
        seed_step(
            self.train_cfg.seed, step_index + 1, self.dp_rank, self.layout.coords(self.rank)[0]
        )
        return self.engine.train_batch(x, y)

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean validation loss over the same held-out sequences for every layout."""
        gb = self.layout.global_batch
        n_batches = max(1, min(self.train_cfg.eval_batches, self.val_batches.n_windows // gb))
        total = 0.0
        module = self.engine.engine.module
        maps_here = self.board is not None and self.layout.tp == 1 and self.layout.zero_stage < 3
        probed = module if maps_here else torch.nn.Module()  # an empty module: no maps
        with (
            GateProbe(module) as gates,
            AttentionProbe(probed, self.model_cfg) as maps,
        ):
            for b in range(n_batches):
                total += self.engine.eval_batch(
                    *self.val_batches.rank_slice(b, gb, self.dp_rank, self.layout.dp)
                )
        self.metrics.evaluation(total / n_batches, gates.means())
        self._gate_means = gates.head_means()
        self._attention_maps = maps.maps() if self.model_cfg.attention == "mla" else {}
        return total / n_batches

    def resume(self) -> int:
        """Load the latest complete checkpoint; returns the step to continue from (0 if none)."""
        found, rejected = self._choose_checkpoint()
        step, saved = 0, None
        if found is not None:
            step, path = found
            saved = saved_layout(path)
            problem = resume_problem(saved, self.layout)
            if problem:
                raise RuntimeError(
                    f"checkpoint {path} was written under {saved.describe() if saved else '?'} "
                    f"and cannot load under {self.layout.describe()}: {problem}"
                )
            meta = load_checkpoint(self.engine, path)
            if self.private is not None:
                self.private.load_state(meta.get("privacy"))
        init_from = self._init_from(found is not None)
        if self.rank == 0:
            resumes = self._count_resumes() + (found is not None)
            self.metrics.start(
                self.train_cfg.steps, resumes, self.flops_per_token, self.plan.peak_flops
            )
            self._trim_metrics(step)
            self._event(
                {
                    "event": "start",
                    "world_size": self.world,
                    "layout": self.layout.to_dict(),
                    "resumed_from_step": step if found else None,
                    "checkpoint": str(found[1]) if found else None,
                    "checkpoint_layout": saved.to_dict() if saved else None,
                    "rejected_checkpoints": [{"path": str(p), "reason": r} for p, r in rejected],
                    "init_from": init_from,
                }
            )
        return step

    def _init_from(self, resumed: bool) -> str | None:
        """Load ``model.init_from``'s weights when the run has no checkpoint of its own (a resume
        wins: its weights descend from them already); returns the source loaded, or ``None``."""
        finetune = self.plan.finetune
        if finetune is None or finetune.init_from is None:
            return None
        if resumed:
            if self.rank == 0:
                self._event(
                    {
                        "event": "init_from_skipped",
                        "init_from": finetune.init_from,
                        "reason": "the run resumes from its own checkpoint",
                    }
                )
            return None
        from workers.init_weights import load_init_weights

        load_init_weights(self.engine, finetune.init_kind or "checkpoint", finetune.init_from)
        return finetune.init_from

    def _choose_checkpoint(self) -> tuple[tuple[int, Path] | None, list[tuple[Path, str]]]:
        """Rank 0 removes stale ``.tmp-`` folders and verifies checkpoints newest first; every
        rank gets its choice (one verification, and the same choice everywhere)."""
        choice: list = [None]
        if self.rank == 0:
            remove_stale_temporaries(self.run_dir)
            found, rejected = (
                find_resumable(self.run_dir) if self.job.checkpoint.resume else (None, [])
            )
            for path, _ in rejected:
                set_aside(path)
            choice = [(found, rejected)]
        if self.world > 1:
            dist.broadcast_object_list(choice, src=0)
        return choice[0]

    def checkpoint(self, step: int) -> Path:
        """Atomic DeepSpeed checkpoint of all ranks; returns its folder."""
        meta = {
            "world_size": self.world,
            "layout": self.layout.to_dict(),
            "model": self.model_cfg.to_dict(),
        }
        if self.private is not None:
            meta["privacy"] = self.private.state()
        started = time.perf_counter()
        path = save_checkpoint(
            self.engine,
            self.run_dir,
            step,
            meta,
            self.rank,
            self.job.checkpoint.keep,
            dist.barrier,
            files={TOKENIZER_FILE: self.tokenizer.to_json()},
        )
        self.metrics.checkpoint(step, time.perf_counter() - started)
        if self.board is not None:
            self.board.flush()  # everything up to a checkpoint survives a kill -9
        return path

    def report(self, step: int) -> None:
        """``ray.train.report`` the latest metrics (every rank: it is a collective).

        No checkpoint is attached: :mod:`workers.checkpoint` is the one owner of checkpoints
        (see :func:`orchestrator.launcher.build_trainer` for why), so Ray Train only carries
        metrics (to the progress of Tune and ``Result.metrics``).
        """
        import ray.train

        ray.train.report({"step": step, **self._last_metrics()})

    # ------------------------------------------------------------------ helpers
    def log(self, record: dict) -> None:
        record = {
            k: (round(v, 6) if isinstance(v, float) and math.isfinite(v) else v)
            for k, v in record.items()
        }
        record = strict_record(record)
        self._last = {**self._last, **record}
        if self.rank != 0:
            return
        if self.board is not None:
            self.board.scalars(record["step"], record)
            if "val_loss" in record:
                self.board.gates(record["step"], self._gate_means)
                self.board.attention(record["step"], self._attention_maps)
        with open(self.run_dir / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(record, allow_nan=False) + "\n")

    def _privacy_metrics(self) -> dict:
        return {} if self.private is None else {"epsilon": self.private.epsilon()}

    def _last_metrics(self) -> dict:
        return {
            k: v
            for k, v in self._last.items()
            if k in ("loss", "val_loss", "tokens_per_s", "epsilon", "diverged") and v is not None
        }

    def _event(self, record: dict) -> None:
        with open(self.run_dir / "events.jsonl", "a") as fh:
            fh.write(json.dumps({"time": time.time(), **record}) + "\n")

    def _count_resumes(self) -> int:
        """Starts of this run recorded in ``events.jsonl`` that resumed from a checkpoint."""
        path = self.run_dir / "events.jsonl"
        if not path.exists():
            return 0
        events = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        return sum(
            1
            for e in events
            if e.get("event") == "start" and e.get("resumed_from_step") is not None
        )

    def _trim_metrics(self, step: int) -> None:
        """Drop records past ``step`` left by an attempt that died after its last checkpoint."""
        path = self.run_dir / "metrics.jsonl"
        if not path.exists():
            return
        keep = [
            line
            for line in path.read_text().splitlines()
            if line.strip() and json.loads(line)["step"] <= step
        ]
        atomic_write(path, "".join(line + "\n" for line in keep))


def _record_worker(run_dir: Path, rank: int, world: int) -> None:
    folder = run_dir / "workers"
    folder.mkdir(parents=True, exist_ok=True)
    write_json_atomic(
        folder / f"rank_{rank}.json",
        {"rank": rank, "world_size": world, "pid": os.getpid(), "host": socket.gethostname()},
    )
