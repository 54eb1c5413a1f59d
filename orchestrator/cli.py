"""The ``mla`` command line: train, plan, bench, submit/jobs/tune, k8s, generate/eval/export.

Human progress goes to stderr, machine-readable output (``--json``) to stdout. User errors
(:class:`orchestrator.contract.errors.MLAError`) print one message and exit non-zero; set
``MLA_TRACEBACK=1`` to see the traceback.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import TYPE_CHECKING

import typer
from rich.markup import escape
from typer.core import TyperGroup

from orchestrator.cli_common import err
from orchestrator.contract.errors import MLAError

if TYPE_CHECKING:  # the click that typer vendors: the type TyperGroup.parse_args declares
    from typer._click import Context


class _RootGroup(TyperGroup):
    """Bare ``mla`` prints the help and succeeds (exit 0).

    click's ``no_args_is_help`` exits 2 in standalone mode, and a root callback with
    ``invoke_without_command`` makes typer parse the (empty) arguments first, which imports
    pydantic for its parameter coercion: ~0.1 s more for every bare ``mla``. Checking for no
    arguments before parsing does neither.
    """

    def parse_args(self, ctx: Context, args: list[str]) -> list[str]:
        if not args:
            typer.echo(ctx.get_help())
            ctx.exit(0)
        return super().parse_args(ctx, args)


app = typer.Typer(
    cls=_RootGroup,
    add_completion=False,
    pretty_exceptions_enable=False,
    help="Size, launch and scale training of MLA (Dynamic Multi-Level Attention) models on Ray.",
)


#: Command modules in help order: ``orchestrator/cli_<group>.py``, each defining ``app`` (see
#: :mod:`orchestrator.cli_common` for the convention). A new command group is one entry here.
COMMAND_MODULES = (
    "train",
    "plan",
    "bench",
    "k8s",
    "jobs",
    "tune",
    "infer",
    "compress",
    "metrics",
    "dashboards",
    "viz",
    "data",
)

for _group in COMMAND_MODULES:
    app.add_typer(importlib.import_module(f"orchestrator.cli_{_group}").app)


#: Packages of the optional extras (pyproject ``[project.optional-dependencies]``): a command
#: that needs one in a plain ``pip install mla-train`` says which extra to install.
EXTRA_OF_PACKAGE = {
    **dict.fromkeys(
        (
            "torch",
            "deepspeed",
            "ray",
            "numpy",
            "scipy",
            "pyarrow",
            "matplotlib",
            "safetensors",
            "opacus",
            "tensorboard",
            "tokenizers",
        ),
        "train",
    ),
    "kubernetes": "k8s",
    **dict.fromkeys(("onnx", "onnxruntime", "onnxscript"), "compress"),
}


def main() -> None:
    """Console-script entry point: click's standalone mode plus one catch for user errors.

    Usage errors (unknown command or option, missing argument, bad value) are click's own: its
    usage message and exit 2. :class:`MLAError` prints ``error: ...`` and exits with its code
    (2; 1 for a failed job); a package of an extra that is not installed (``mla train`` after a
    plain ``pip install mla-train``) names the extra to install, exit 2. Set ``MLA_TRACEBACK=1``
    to see the traceback instead.
    """
    _stop_on_sigterm()
    try:
        app()
    except MLAError as exc:
        _fail(exc, str(exc), exc.exit_code)
    except ModuleNotFoundError as exc:
        extra = EXTRA_OF_PACKAGE.get((exc.name or "").partition(".")[0])
        if extra is None:
            raise
        _fail(
            exc,
            f"this command needs the {exc.name!r} package, which comes with the [{extra}] "
            f"extras: pip install 'mla-train[{extra}]'",
            2,
        )


def _stop_on_sigterm() -> None:
    """SIGTERM (``kill``, Kubernetes, Ray job stop) stops a command the way Ctrl-C does.

    Python's default SIGTERM ends the process without unwinding, so the staging folder of an
    atomic output (``mla compress``, ``mla export``, ``mla prepare``: ``.tmp-NAME-*``) was left
    behind; raising ``KeyboardInterrupt`` runs the cleanup and exits 130 as Ctrl-C does. A
    handler installed by whoever started us (not ``SIG_DFL``) is kept.
    """
    import signal

    def stop(signum: int, _frame) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, stop)


def _fail(exc: Exception, message: str, exit_code: int) -> None:
    if os.environ.get("MLA_TRACEBACK"):
        raise exc
    err.print(f"[bold red]error:[/] {escape(message)}", markup=True)
    sys.exit(exit_code)


if __name__ == "__main__":
    main()
