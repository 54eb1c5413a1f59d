"""The function Ray Train ships to its workers, importable without torch.

The driver (``mla train``, possibly a Ray job on a cluster's head node) only needs a reference
to the worker entry point; importing :mod:`workers.train_loop` there would load torch and
DeepSpeed into a process that never trains. Ray pickles this function by module and name, and
each worker imports the training loop when it runs it.
"""

from __future__ import annotations


def train_loop_per_worker(config: dict) -> None:
    """Ray Train entry point; see :func:`workers.train_loop.train_loop_per_worker`."""
    from workers.train_loop import train_loop_per_worker as run

    run(config)
