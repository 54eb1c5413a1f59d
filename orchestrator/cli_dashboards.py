"""``mla dashboards build [--root .] [--check]``: the generated ``dashboards/`` and
``k8s/monitoring/`` (:mod:`orchestrator.dashboards`); ``--check`` writes nothing and exits 1
when they differ from a fresh build.
"""

from __future__ import annotations

from pathlib import Path

import typer

from orchestrator.cli_common import err

app = typer.Typer(
    name="dashboards", no_args_is_help=True, help="Grafana dashboards and Prometheus rules."
)


@app.command("build")
def build_command(
    root: Path = typer.Option(
        Path("."), "--root", help="Repository root: writes ROOT/dashboards and ROOT/k8s/monitoring."
    ),
    check: bool = typer.Option(
        False, "--check", help="Write nothing; exit 1 if ROOT differs from a fresh build."
    ),
) -> None:
    """Generate the Grafana dashboards, Prometheus rules, provisioning and KubeRay monitoring
    manifests (PodMonitors, PrometheusRule, dashboard ConfigMaps)."""
    from orchestrator.dashboards import build_files, stale_files, write_files

    files = build_files()
    if check:
        stale = stale_files(root, files)
        if stale:
            err.print(
                f"{', '.join(stale)} differ from a fresh build; regenerate with "
                f"`mla dashboards build --root {root}`"
            )
            raise typer.Exit(1)
        err.print(f"{len(files)} generated files up to date under {root}")
        return
    for path in write_files(root, files):
        err.print(f"wrote {path}")
