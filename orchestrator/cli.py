"""The ``mla`` command line: train, plan, bench, submit/jobs/tune, k8s, generate/eval/export.

Human progress goes to stderr, machine-readable output (``--json``) to stdout. User errors
(:class:`orchestrator.contract.errors.MLAError`) print one message and exit non-zero; set
``MLA_TRACEBACK=1`` to see the traceback.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Optional

import typer
from rich.markup import escape

from orchestrator.cli_common import SetOption, err
from orchestrator.contract.errors import MLAError

app = typer.Typer(
    add_completion=False,
    pretty_exceptions_enable=False,
    help="Size, launch and scale training of MLA (Dynamic Multi-Level Attention) models on Ray.",
)


@app.callback(invoke_without_command=True)
def _root(ctx: typer.Context) -> None:
    """Bare ``mla`` prints the help and succeeds (exit 0)."""
    if ctx.invoked_subcommand is None:
        typer.echo(ctx.get_help())
        raise typer.Exit(0)


@app.command()
def train(
    config: str = typer.Argument(..., help="Job YAML, e.g. configs/tiny.yaml."),
    set_: Optional[list[str]] = SetOption,
    json_out: bool = typer.Option(False, "--json", help="Print summary.json to stdout at the end."),
    preflight: bool = typer.Option(
        True,
        "--preflight/--no-preflight",
        help="With cluster.address: check every node's Python and the job's paths first.",
    ),
) -> None:
    """Train a model: plan the layout, start (or connect to) Ray and run DeepSpeed workers."""
    from orchestrator.config import load_job_config
    from orchestrator.launcher import run_training

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
    from orchestrator.cli_bench import app as bench_app
    from orchestrator.cli_infer import eval_command, export, generate
    from orchestrator.cli_jobs import app as jobs_app
    from orchestrator.cli_jobs import submit
    from orchestrator.cli_observe import register as register_observe
    from orchestrator.cli_plan import plan
    from orchestrator.cli_tune import tune
    from orchestrator.k8s.cli import app as k8s_app

    app.command("plan")(plan)
    app.add_typer(bench_app, name="bench", help="Benchmarks (attention, quality, decoding).")
    app.add_typer(k8s_app, name="k8s", help="KubeRay manifests: render, submit, status, delete.")
    app.command("submit")(submit)
    app.command("tune")(tune)
    app.add_typer(jobs_app, name="jobs", help="Jobs on a Ray cluster: list, status, logs, stop.")
    app.command("generate")(generate)
    app.command("eval")(eval_command)
    app.command("export")(export)
    register_observe(app)


_register_subcommands()


def main() -> None:
    """Console-script entry point: click's standalone mode plus one catch for user errors.

    Usage errors (unknown command or option, missing argument, bad value) are click's own: its
    usage message and exit 2. :class:`MLAError` prints ``error: ...`` and exits with its code
    (2; 1 for a failed job); set ``MLA_TRACEBACK=1`` to see its traceback instead.
    """
    try:
        app()
    except MLAError as exc:
        if os.environ.get("MLA_TRACEBACK"):
            raise
        err.print(f"[bold red]error:[/] {escape(str(exc))}", markup=True)
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
