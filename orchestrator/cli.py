"""The ``mla`` command line: train, plan, bench, submit/jobs/tune, k8s.

Human progress goes to stderr, machine-readable output (``--json``) to stdout. User errors
(:class:`orchestrator.errors.MLAError`) print one message and exit non-zero; set
``MLA_TRACEBACK=1`` to see the traceback.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape

from orchestrator.errors import MLAError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Size, launch and scale training of MLA (Dynamic Multi-Level Attention) models on Ray.")
err_console = Console(stderr=True)

SetOption = typer.Option(None, "--set", help="Override a config field: --set train.steps=100 (repeatable).")


@app.command()
def train(
    config: str = typer.Argument(..., help="Job YAML, e.g. configs/tiny.yaml."),
    set_: Optional[list[str]] = SetOption,
    json_out: bool = typer.Option(False, "--json", help="Print summary.json to stdout at the end."),
    preflight: bool = typer.Option(True, "--preflight/--no-preflight",
                                   help="With cluster.address: check every node's Python and the job's paths first."),
) -> None:
    """Train a model: plan the layout, start (or connect to) Ray and run DeepSpeed workers."""
    from orchestrator.config import load_job_config
    from orchestrator.controller import run_training

    job = load_job_config(config, set_ or [])
    summary = run_training(job, preflight=preflight)
    if json_out:
        print(json.dumps(summary, indent=2))


@app.command()
def schema() -> None:
    """Print the JSON Schema of the job YAML (for editor completion and validation)."""
    from orchestrator.config import job_json_schema

    print(json.dumps(job_json_schema(), indent=2))


def _register_subcommands() -> None:
    from orchestrator.cli_plan import plan
    from orchestrator.k8s.cli import app as k8s_app
    from orchestrator.cli_bench import app as bench_app
    from orchestrator.cli_jobs import app as jobs_app
    from orchestrator.cli_jobs import submit
    from orchestrator.cli_tune import tune

    app.command("plan")(plan)
    app.add_typer(bench_app, name="bench", help="Benchmarks (attention speed and memory).")
    app.add_typer(k8s_app, name="k8s", help="KubeRay manifests: render, submit, status, delete.")
    app.command("submit")(submit)
    app.command("tune")(tune)
    app.add_typer(jobs_app, name="jobs", help="Jobs on a Ray cluster: list, status, logs, stop.")


_register_subcommands()


def _click_exception_types() -> tuple[type, ...]:
    """Click's exception base, and the copy of click that typer >= 0.2x vendors."""
    import click

    types: list[type] = [click.ClickException]
    try:
        from typer._click.exceptions import ClickException as VendoredClickException

        types.append(VendoredClickException)
    except ImportError:
        pass
    return tuple(types)


def main() -> None:
    """Console-script entry point: run the app, turning user errors into one-line messages.

    Usage errors (unknown command or option, missing argument, bad value) print click's usage
    message and exit 2; :class:`MLAError` prints ``error: ...`` and exits with its code; set
    ``MLA_TRACEBACK=1`` to see the traceback of either.
    """
    try:
        app(standalone_mode=False)
    except MLAError as exc:
        if os.environ.get("MLA_TRACEBACK"):
            raise
        err_console.print(f"[bold red]error:[/] {escape(str(exc))}", markup=True, highlight=False)
        sys.exit(exc.exit_code)
    except (typer.Exit, SystemExit) as exc:
        sys.exit(getattr(exc, "exit_code", getattr(exc, "code", 0)))
    except Exception as exc:
        if os.environ.get("MLA_TRACEBACK"):
            raise
        if isinstance(exc, _click_exception_types()):
            exc.show()
            sys.exit(0 if type(exc).__name__ == "NoArgsIsHelpError" else exc.exit_code)
        if type(exc).__name__ == "Abort":  # Ctrl-C at a prompt
            sys.exit(130)
        raise


if __name__ == "__main__":
    main()
