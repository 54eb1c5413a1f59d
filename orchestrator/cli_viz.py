"""``mla viz``: PNG plots of runs, plans and attention (matplotlib, imported when used).

* ``mla viz run RUN_DIR``: loss, throughput and lr (:mod:`orchestrator.viz_run`);
* ``mla viz compare RUN...``: validation loss of several runs against tokens;
* ``mla viz plan PLAN_JSON``: memory of each candidate layout of ``mla plan --json``
  (:mod:`orchestrator.viz_plan`);
* ``mla viz gates SOURCE``: the mean gate per layer and head;
* ``mla viz attention SOURCE --layer L --head H``: a head's effective attention
  (:mod:`orchestrator.viz_attention`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from orchestrator.cli_common import err

app = typer.Typer(
    name="viz", no_args_is_help=True, help="Plots of runs, plans and attention (PNG)."
)


@app.command("run")
def viz_run_command(
    run_dir: Path = typer.Argument(..., help="Run folder, e.g. runs/tiny."),
    out: Optional[Path] = typer.Option(
        None, "-o", "--out", help="Folder for the PNGs (default: RUN_DIR/plots)."
    ),
) -> None:
    """Plot a run: loss against step and tokens (resumes and layout changes marked),
    throughput, learning rate."""
    from orchestrator.viz_run import plot_run

    for path in plot_run(run_dir, out or run_dir / "plots").values():
        err.print(f"wrote {path}")


@app.command("compare")
def viz_compare_command(
    run_dirs: list[Path] = typer.Argument(..., help="Run folders."),
    out: Path = typer.Option(Path("compare.png"), "-o", "--out", help="PNG to write."),
) -> None:
    """Validation loss of several runs against tokens, on one chart."""
    from orchestrator.viz_run import plot_compare

    err.print(f"wrote {plot_compare(run_dirs, out)}")


@app.command("attention")
def viz_attention_command(
    source: str = typer.Argument(..., help="Run folder, checkpoint folder or `mla export` folder."),
    layer: int = typer.Option(0, "--layer", help="Transformer block, 0-based."),
    head: int = typer.Option(0, "--head", help="Query head, 0-based."),
    text: Optional[str] = typer.Option(
        None, "--text", help="Text to attend over (default: a Python snippet)."
    ),
    out: Path = typer.Option(Path("attention.png"), "-o", "--out", help="PNG to write."),
) -> None:
    """Heat map of a head's effective attention (gate x local + (1 - gate) x global), with the
    local band and the global keys outlined."""
    from orchestrator.viz_attention import plot_attention

    err.print(f"wrote {plot_attention(source, layer, head, text, out)}")


@app.command("gates")
def viz_gates_command(
    source: str = typer.Argument(..., help="Run folder, checkpoint folder or `mla export` folder."),
    text: Optional[str] = typer.Option(
        None, "--text", help="Text to run (default: a Python snippet)."
    ),
    out: Path = typer.Option(Path("gates.png"), "-o", "--out", help="PNG to write."),
) -> None:
    """Layer x head heat map of the mean gate (share of the local branch) on a text."""
    from orchestrator.viz_attention import plot_gates

    err.print(f"wrote {plot_gates(source, text, out)}")


@app.command("plan")
def viz_plan_command(
    plan_json: str = typer.Argument(
        ..., help="Output of `mla plan ... --json` (a file, or - for stdin)."
    ),
    out: Path = typer.Option(Path("plan.png"), "-o", "--out", help="PNG to write."),
) -> None:
    """Memory per GPU of each candidate layout, stacked by component, with the GPU limit."""
    from orchestrator.viz_plan import plot_plan

    err.print(f"wrote {plot_plan(plan_json, out)}")
