"""``mla metrics`` and ``mla dashboards``: watch a run in Prometheus and Grafana.

* ``mla metrics scrape-config --port P`` prints a ``prometheus.yml`` that scrapes a local run's
  metrics endpoint (``cluster.metrics_port``) on 127.0.0.1 with static targets (never Ray's
  ``file_sd`` discovery file, whose addresses depend on Ray's loopback pinning);
* ``mla viz run RUN_DIR`` writes loss, throughput and lr plots (:mod:`orchestrator.viz_run`);
* ``mla viz compare RUN...`` overlays their validation loss against tokens;
* ``mla viz plan PLAN_JSON`` draws the memory of each candidate layout of ``mla plan --json``;
* ``mla viz gates SOURCE`` draws the mean gate per layer and head;
* ``mla viz attention SOURCE --layer L --head H`` writes a head's effective attention
  (:mod:`orchestrator.viz_attention`);
* ``mla dashboards build [--root .] [--check]`` writes the generated ``dashboards/`` and
  ``k8s/monitoring/`` (:mod:`orchestrator.dashboards`), or with ``--check`` exits 1 when they
  differ from a fresh build.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
import yaml

from orchestrator.cli_common import err
from orchestrator.contract.errors import ConfigError

metrics_app = typer.Typer(no_args_is_help=True, help="Prometheus metrics of local runs.")
dashboards_app = typer.Typer(no_args_is_help=True, help="Grafana dashboards and Prometheus rules.")
viz_app = typer.Typer(no_args_is_help=True, help="Plots of runs (PNG).")


def scrape_config(port: int, interval: str = "15s", rules: Optional[str] = None) -> dict:
    """The ``prometheus.yml`` of one local run.

    Args:
        port: The run's metrics port (``cluster.metrics_port``; ``mla train`` prints it).
        interval: Prometheus duration between scrapes (``1s`` .. ``1m``); Ray exports a new
            value every ``RAY_metrics_report_interval_ms`` (10 s by default).
        rules: Optional path of ``dashboards/prometheus/rules.yml`` to load.

    Raises:
        ConfigError: ``port`` is outside 1..65535.
    """
    if not 1 <= port <= 65535:
        raise ConfigError(
            f"--port={port} is not a TCP port; give the cluster.metrics_port of the run"
        )
    config: dict = {
        "global": {"scrape_interval": interval, "evaluation_interval": interval},
        "scrape_configs": [
            {
                "job_name": "mla-train",
                "static_configs": [{"targets": [f"127.0.0.1:{port}"]}],
            }
        ],
    }
    if rules:
        config["rule_files"] = [rules]
    return config


@metrics_app.command("scrape-config")
def scrape_config_command(
    port: int = typer.Option(..., "--port", help="The run's cluster.metrics_port."),
    interval: str = typer.Option("15s", "--interval", help="Scrape interval, e.g. 1s or 15s."),
    rules: Optional[str] = typer.Option(
        None, "--rules", help="Also load this rules file (dashboards/prometheus/rules.yml)."
    ),
) -> None:
    """Print a prometheus.yml scraping a local run on 127.0.0.1."""
    print(yaml.safe_dump(scrape_config(port, interval, rules), sort_keys=False), end="")


@dashboards_app.command("build")
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


@viz_app.command("run")
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


@viz_app.command("compare")
def viz_compare_command(
    run_dirs: list[Path] = typer.Argument(..., help="Run folders."),
    out: Path = typer.Option(Path("compare.png"), "-o", "--out", help="PNG to write."),
) -> None:
    """Validation loss of several runs against tokens, on one chart."""
    from orchestrator.viz_run import plot_compare

    err.print(f"wrote {plot_compare(run_dirs, out)}")


@viz_app.command("attention")
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


@viz_app.command("gates")
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


@viz_app.command("plan")
def viz_plan_command(
    plan_json: str = typer.Argument(
        ..., help="Output of `mla plan ... --json` (a file, or - for stdin)."
    ),
    out: Path = typer.Option(Path("plan.png"), "-o", "--out", help="PNG to write."),
) -> None:
    """Memory per GPU of each candidate layout, stacked by component, with the GPU limit."""
    from orchestrator.viz_plan import plot_plan

    err.print(f"wrote {plot_plan(plan_json, out)}")


def register(app: typer.Typer) -> None:
    """Add ``metrics``, ``dashboards`` and ``viz`` to the ``mla`` app."""
    app.add_typer(metrics_app, name="metrics", help="Prometheus metrics of local runs.")
    app.add_typer(
        dashboards_app, name="dashboards", help="Grafana dashboards and Prometheus rules."
    )
    app.add_typer(viz_app, name="viz", help="Plots of runs (PNG).")
