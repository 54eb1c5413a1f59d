"""``mla plan``: placeholder until the planner lands (issue 3)."""

import typer


def plan() -> None:
    """Choose a data x tensor x pipeline layout (not implemented yet)."""
    raise typer.Exit(2)
