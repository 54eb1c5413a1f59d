"""``mla k8s``: placeholder until the KubeRay integration lands (issue 7)."""

import typer

app = typer.Typer(no_args_is_help=True)


@app.command()
def render() -> None:
    """Render a RayJob manifest (not implemented yet)."""
    raise typer.Exit(2)
