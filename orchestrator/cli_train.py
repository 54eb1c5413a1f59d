"""``mla train`` and ``mla schema``: run a job on Ray, print the job YAML's JSON Schema."""

from __future__ import annotations

import json
from typing import Optional

import typer

from orchestrator.cli_common import SetOption

app = typer.Typer()


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
