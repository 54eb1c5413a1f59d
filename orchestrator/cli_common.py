"""What every ``mla`` subcommand shares: the two rich consoles and the ``--set`` option.

Human words (progress, tables, errors) go to :data:`err` (stderr); machine-readable output and
tables a user may pipe go to :data:`out` (stdout). Markup and highlighting are off, because run
names, paths and layouts may hold brackets and numbers that must print as they are; a caller
that styles one line passes ``markup=True`` for that call.
"""

from __future__ import annotations

import typer
from rich.console import Console

err = Console(stderr=True, highlight=False, markup=False)
out = Console(highlight=False, markup=False)

SetOption = typer.Option(
    None, "--set", help="Override a config field: --set train.steps=100 (repeatable)."
)
