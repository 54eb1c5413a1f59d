"""What every ``mla`` command module shares: the two rich consoles and the ``--set`` option.

The CLI's one convention: every command module is ``orchestrator/cli_<group>.py`` and defines a
``typer.Typer`` named ``app``; ``orchestrator.cli`` registers it with one line in
:data:`orchestrator.cli.COMMAND_MODULES`. An ``app`` with ``name=`` (and ``help=``) becomes a
command group (``mla k8s render``); an ``app`` without a name adds its commands at the top
(``mla plan``). Command modules print through :data:`err` and :data:`out`, never a console of
their own, and raise :class:`orchestrator.contract.errors.MLAError` for user errors (printed
by ``orchestrator.cli.main``, exit 2).

Human words (progress, tables, errors) go to :data:`err` (stderr); machine-readable output and
tables a user may pipe go to :data:`out` (stdout). Markup and highlighting are off, because run
names, paths and layouts may hold brackets and numbers that must print as they are; a caller
that styles one line passes ``markup=True`` for that call. On a terminal the consoles take its
width; piped or captured they are :data:`PIPE_WIDTH` columns wide, so that wide tables (``mla
plan`` has 21 columns) are not folded to rich's default of 80.
"""

from __future__ import annotations

import sys

import typer
from rich.console import Console

#: Columns of a console that does not write to a terminal.
PIPE_WIDTH = 200


def _console(stderr: bool) -> Console:
    stream = sys.stderr if stderr else sys.stdout
    width = None if stream.isatty() else PIPE_WIDTH
    return Console(stderr=stderr, highlight=False, markup=False, width=width)


err = _console(stderr=True)
out = _console(stderr=False)

SetOption = typer.Option(
    None, "--set", help="Override a config field: --set train.steps=100 (repeatable)."
)
