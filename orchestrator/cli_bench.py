"""``mla bench``: placeholder until the attention benchmark lands (issue 5)."""

import typer

app = typer.Typer(no_args_is_help=True)


@app.command()
def attention() -> None:
    """Benchmark MLA against dense attention (not implemented yet)."""
    raise typer.Exit(2)
