"""The ``mla`` command line as tests run it: a child process, the tiny config and the overrides
that make a tiny training run take seconds (the fixtures in ``tests/conftest.py`` hand these out;
modules that share helpers import them from here)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterable
from dataclasses import dataclass

TINY_CONFIG = "configs/tiny.yaml"

# Short sequences, small batches and frequent logs, evals and checkpoints: a tiny run of a few
# dozen steps that still logs, evaluates and checkpoints (tests append their own `--set`s after
# these; the later one wins).
FAST_OVERRIDES = (
    "data.seq_len=64",
    "train.micro_batch=4",
    "train.global_batch=16",
    "train.warmup_steps=5",
    "train.log_every=5",
    "train.eval_every=10",
    "train.eval_batches=2",
    "checkpoint.every=10",
)


@dataclass(frozen=True)
class MlaCli:
    """The ``mla`` command run as a child process (``python -m orchestrator.cli``), so that each
    test sees exit status, stdout and stderr exactly as a user does."""

    prefix: tuple[str, ...] = (sys.executable, "-m", "orchestrator.cli")

    def command(self, *args: str, sets: Iterable[str] = ()) -> list[str]:
        """The argument vector: ``mla ARGS --set S1 --set S2 ...``."""
        return [*self.prefix, *args, *[a for s in sets for a in ("--set", s)]]

    def __call__(
        self, *args: str, sets: Iterable[str] = (), timeout: float = 600, cwd=None
    ) -> subprocess.CompletedProcess:
        """Run ``mla ARGS --set ...`` (in ``cwd``, default the current folder) to completion and
        capture its text output."""
        return subprocess.run(
            self.command(*args, sets=sets),
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=cwd,
        )
