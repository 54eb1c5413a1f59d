"""``mla submit`` and ``mla jobs list|status|logs|stop``: Ray Job Submission from the CLI."""

from __future__ import annotations

import json
from typing import Optional

import typer
from rich.table import Table

from orchestrator.cli_common import SetOption, err, out

AddressOption = typer.Option(
    None,
    "--address",
    envvar="RAY_ADDRESS",
    help="Ray dashboard address, e.g. http://127.0.0.1:8265 (or RAY_ADDRESS).",
)
TokenOption = typer.Option(
    None,
    "--token-file",
    help="File holding the cluster's auth token "
    "(default: RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token).",
)

app = typer.Typer()
jobs = typer.Typer(
    name="jobs", help="Jobs on a Ray cluster: list, status, logs, stop.", no_args_is_help=True
)
app.add_typer(jobs)


@app.command()
def submit(
    config: str = typer.Argument(..., help="Job YAML (validated here before anything is sent)."),
    set_: Optional[list[str]] = SetOption,
    address: Optional[str] = AddressOption,
    token_file: Optional[str] = TokenOption,
    storage_path: Optional[str] = typer.Option(
        None,
        "--storage-path",
        help="Run folders on the cluster (default: cluster.storage_path or /tmp/mla-runs).",
    ),
    follow_logs: bool = typer.Option(
        False, "--follow", help="Stream logs until the job ends; exit non-zero if it failed."
    ),
    tune: bool = typer.Option(
        False, "--tune", help="Submit a sweep: `mla tune` on the cluster (pass --search ...)."
    ),
    search: Optional[list[str]] = typer.Option(
        None, "--search", help="With --tune: KEY=V1,V2,... (repeatable)."
    ),
    samples: int = typer.Option(1, "--samples", help="With --tune: samples per grid point."),
    scheduler: str = typer.Option("asha", "--scheduler", help="With --tune: asha or fifo."),
    max_steps: Optional[int] = typer.Option(
        None, "--max-steps", help="With --tune: steps per trial."
    ),
    preflight: bool = typer.Option(
        True,
        "--preflight/--no-preflight",
        help="First run a small job that checks every node's Python and the job's paths.",
    ),
) -> None:
    """Submit a training job (or with --tune a sweep) to a Ray cluster through the Job Submission API."""
    from orchestrator.jobs import follow
    from orchestrator.jobs import submit as submit_job

    args: list[str] = []
    command = "train"
    if tune:
        command = "tune"
        for item in search or []:
            args += ["--search", item]
        args += ["--samples", str(samples), "--scheduler", scheduler]
        if max_steps:
            args += ["--max-steps", str(max_steps)]
    client, sid = submit_job(
        config, set_ or [], address, token_file, storage_path, args, command, preflight=preflight
    )
    print(sid)
    err.print(f"submitted {sid}; follow it with: mla jobs logs {sid} --follow")
    if follow_logs:
        status = follow(client, sid, lambda line: err.print(line, markup=False))
        err.print(f"job {sid} {status}")


@jobs.command("list")
def list_jobs(
    address: Optional[str] = AddressOption,
    token_file: Optional[str] = TokenOption,
    json_out: bool = typer.Option(False, "--json", help="Print JSON to stdout."),
) -> None:
    """List the cluster's jobs (newest last)."""
    from orchestrator.jobs import connect

    jobs = sorted(connect(address, token_file).list_jobs(), key=lambda j: j.start_time or 0)
    rows = [
        {
            "id": j.submission_id,
            "status": str(j.status.value),
            "entrypoint": j.entrypoint,
            "message": j.message,
        }
        for j in jobs
    ]
    if json_out:
        print(json.dumps(rows, indent=2))
        return
    table = Table("submission id", "status", "entrypoint")
    for r in rows:
        table.add_row(r["id"] or "-", r["status"], r["entrypoint"])
    out.print(table)


@jobs.command()
def status(
    submission_id: str,
    address: Optional[str] = AddressOption,
    token_file: Optional[str] = TokenOption,
) -> None:
    """Print a job's status and message."""
    from orchestrator.jobs import connect, require_known_job

    info = require_known_job(connect(address, token_file), submission_id)
    print(f"{submission_id}: {info.status.value}" + (f" ({info.message})" if info.message else ""))


@jobs.command()
def logs(
    submission_id: str,
    address: Optional[str] = AddressOption,
    token_file: Optional[str] = TokenOption,
    follow_logs: bool = typer.Option(False, "--follow", help="Stream until the job ends."),
) -> None:
    """Print a job's logs (--follow streams them and exits non-zero if the job failed)."""
    from orchestrator.jobs import connect, follow, require_known_job

    client = connect(address, token_file)
    require_known_job(client, submission_id)
    if follow_logs:
        follow(client, submission_id, print)
    else:
        print(client.get_job_logs(submission_id), end="")


@jobs.command()
def stop(
    submission_id: str,
    address: Optional[str] = AddressOption,
    token_file: Optional[str] = TokenOption,
) -> None:
    """Stop a running job."""
    from orchestrator.jobs import connect, require_known_job, wait_terminal

    client = connect(address, token_file)
    require_known_job(client, submission_id)
    client.stop_job(submission_id)
    print(f"{submission_id}: {wait_terminal(client, submission_id, timeout_s=30)}")
