"""``mla metrics scrape-config --port P``: a ``prometheus.yml`` for a local run.

It scrapes the run's metrics endpoint (``cluster.metrics_port``, which ``mla train`` prints) on
127.0.0.1 with static targets, never Ray's ``file_sd`` discovery file, whose addresses depend on
Ray's loopback pinning (``../shared/anchors/observability/REPORT.md`` §1.3).
"""

from __future__ import annotations

from typing import Optional

import typer

from orchestrator.contract.errors import ConfigError

app = typer.Typer(name="metrics", no_args_is_help=True, help="Prometheus metrics of local runs.")


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


@app.command("scrape-config")
def scrape_config_command(
    port: int = typer.Option(..., "--port", help="The run's cluster.metrics_port."),
    interval: str = typer.Option("15s", "--interval", help="Scrape interval, e.g. 1s or 15s."),
    rules: Optional[str] = typer.Option(
        None, "--rules", help="Also load this rules file (dashboards/prometheus/rules.yml)."
    ),
) -> None:
    """Print a prometheus.yml scraping a local run on 127.0.0.1."""
    import yaml  # here, not at import: every `mla` command loads this module

    print(yaml.safe_dump(scrape_config(port, interval, rules), sort_keys=False), end="")
