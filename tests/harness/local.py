"""Run a function on N local gloo processes without Ray (tests, benchmarks, debugging).

Each process gets ``MASTER_ADDR=127.0.0.1``, a free port, one torch thread, DeepSpeed's
distributed backend initialised over gloo (with its JIT-compiled CPU shared-memory op disabled,
as :func:`workers.train_loop.init_distributed` does), and calls ``fn(rank, world_size, *args)``.
:func:`run_local` returns the per-rank results in rank order, or raises the first failure.
"""

from __future__ import annotations

import os
import queue as queue_mod
import time
import traceback

import torch.multiprocessing as mp

from orchestrator.launcher import free_port


def _entry(rank: int, world_size: int, port: int, fn, args: tuple, queue) -> None:
    import torch

    os.environ.update(
        {
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world_size),
            "LOCAL_WORLD_SIZE": str(world_size),
        }
    )
    torch.set_num_threads(1)
    try:
        import torch.distributed as dist

        from workers.train_loop import init_distributed

        init_distributed(use_gpu=False)
        result = fn(rank, world_size, *args)
        dist.barrier()
        queue.put((rank, "ok", result))
        dist.destroy_process_group()
    except BaseException:  # report everything to the parent, which raises
        queue.put((rank, "error", traceback.format_exc()))
        raise


def run_local(fn, world_size: int, *args, timeout_s: float = 600.0) -> list:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` spawned processes.

    ``fn`` and ``args`` must be picklable (a module-level function). Results must be picklable.

    Raises:
        RuntimeError: a process failed (its traceback is in the message) or timed out.
    """
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_entry, args=(r, world_size, port, fn, args, queue), daemon=False)
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    results: dict[int, object] = {}
    try:
        deadline = time.monotonic() + timeout_s
        while len(results) < world_size:
            try:
                rank, status, payload = queue.get(timeout=1.0)
            except queue_mod.Empty:
                dead = [
                    r
                    for r, p in enumerate(procs)
                    if p.exitcode not in (None, 0) and r not in results
                ]
                if dead or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"ranks {dead} of {world_size} died without a result"
                        if dead
                        else f"no result within {timeout_s} s"
                    ) from None
                continue
            if status == "error":
                raise RuntimeError(f"rank {rank} of {world_size} failed:\n{payload}")
            results[rank] = payload
        for p in procs:
            p.join(timeout=timeout_s)
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join(5)
    return [results[r] for r in range(world_size)]
