"""``mla tune``: Ray Tune sweep over attention settings (window x top-k) with ASHA or FIFO."""

from __future__ import annotations

from typing import Optional

import typer
from rich.table import Table

from orchestrator.cli_common import SetOption, err

app = typer.Typer()


@app.command()
def tune(
    config: str = typer.Argument(
        ..., help="Base job YAML; each trial overrides the searched fields."
    ),
    search: list[str] = typer.Option(
        ..., "--search", help="KEY=V1,V2,... e.g. model.local_window=16,32,64 (repeatable)."
    ),
    set_: Optional[list[str]] = SetOption,
    samples: int = typer.Option(
        1, "--samples", help="Samples per grid point (grid) or trials (random)."
    ),
    scheduler: str = typer.Option(
        "asha", "--scheduler", help="asha (stops bad trials early) or fifo."
    ),
    metric: str = typer.Option("val_loss", "--metric", help="Metric to minimise."),
    max_steps: Optional[int] = typer.Option(
        None, "--max-steps", help="Steps per trial (default: train.steps)."
    ),
    search_mode: str = typer.Option(
        "grid", "--search-mode", help="grid (every combination) or random."
    ),
    resume: bool = typer.Option(
        False, "--resume", help="Restore an interrupted sweep of the same run name."
    ),
    address: Optional[str] = typer.Option(
        None,
        "--address",
        help="Ray cluster to run on (sets cluster.address), "
        "e.g. auto or 127.0.0.1:6379; unset starts an embedded Ray.",
    ),
    preflight: bool = typer.Option(
        True,
        "--preflight/--no-preflight",
        help="With an address: check every node's Python and the job's paths first.",
    ),
) -> None:
    """Sweep attention settings with Ray Tune; writes trials.json, best.yaml and val_loss.png."""
    from orchestrator.config import load_job_config
    from orchestrator.contract.errors import ConfigError
    from orchestrator.tune import parse_search, run_sweep

    if search_mode not in ("grid", "random"):
        raise ConfigError(f"--search-mode {search_mode!r}: choose grid or random")
    job = load_job_config(
        config, [*(set_ or []), *([f"cluster.address={address}"] if address else [])]
    )
    space = parse_search(search)
    result = run_sweep(
        job, space, samples, scheduler, metric, max_steps, search_mode, resume, preflight
    )
    table = Table(*space, f"best {metric}", "steps", "stopped early", "error", title="trials")
    for row in sorted(
        result.rows, key=lambda r: (r[f"best_{metric}"] is None, r[f"best_{metric}"] or 0)
    ):
        best = row[f"best_{metric}"]
        table.add_row(
            *[str(row[k]) for k in space],
            "-" if best is None else f"{best:.4f}",
            str(row["steps"]),
            "yes" if row["stopped_early"] else "no",
            row["error"] or "",
        )
    err.print(table)
    err.print(
        f"best: {', '.join(f'{k}={result.best[k]}' for k in space)}  {metric} {result.best[f'best_{metric}']:.4f}"
    )
    err.print(
        f"wrote {result.sweep_dir / 'trials.json'}, {result.sweep_dir / 'best.yaml'}, "
        f"{result.sweep_dir / 'val_loss.png'}"
    )
    print(result.sweep_dir / "best.yaml")
