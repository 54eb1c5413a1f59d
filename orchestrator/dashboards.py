"""The project's Grafana dashboard, its Prometheus rules and Grafana provisioning, from code.

``mla dashboards build [--root .] [--check]`` writes (or compares) ``dashboards/``:

* ``mla-train.json``: the run-scoped dashboard (uid ``mla-train``), rows progress, efficiency,
  memory, health, attention, variables ``datasource``, ``run``, ``rank``; every query reads a
  metric of :data:`orchestrator.contract.metrics.METRICS` (``ray_mla_*``) or one of Ray's own;
* ``ray/train.json``, ``ray/default.json``: Ray's own Train and Default dashboards, regenerated
  from the installed (pinned) Ray by its ``grafana_dashboard_factory``;
* ``prometheus/rules.yml``: recording rules for the derived quantities (tokens/s, straggler
  ratio, MFU, ETA) and the alerts (stalled, loss not finite, straggler, restarts, stale
  checkpoint), checked and unit-tested with ``promtool``;
* ``provisioning/``: Grafana file provisioning (a Prometheus datasource, the dashboards folder);

and ``k8s/monitoring/`` for KubeRay with kube-prometheus-stack: PodMonitors, a PrometheusRule
holding the rules above, and one ConfigMap per dashboard (:func:`monitoring_manifests`).

JSON is written with sorted keys and stable ids so that a diff of a regeneration is readable;
the panels are data (:class:`Panel`), placed on Grafana's 24-column grid automatically.
Design: ``../shared/anchors/observability/REPORT.md`` §3.3.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

RUN = 'ray_train_run_name=~"$run"'
RANK = 'ray_train_worker_world_rank=~"$rank"'
GRID_COLUMNS = 24
DASHBOARD_UID = "mla-train"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}


@dataclass(frozen=True)
class Target:
    """One PromQL query of a panel (``$run``, ``$rank``, ``$__rate_interval`` are variables)."""

    expr: str
    legend: str = ""


@dataclass(frozen=True)
class Panel:
    """A dashboard panel.

    Attributes:
        title: Panel title.
        description: What it shows and how to read it.
        targets: Its queries.
        unit: Grafana unit id (``s``, ``bytes``, ``percentunit``, ``short``, ...).
        kind: ``timeseries`` or ``stat``.
        width, height: Grid size (24 columns).
        requires: ``{"gpu"}`` for panels that only have data on GPU nodes.
    """

    title: str
    description: str
    targets: tuple[Target, ...]
    unit: str = "short"
    kind: str = "timeseries"
    width: int = 8
    height: int = 8
    requires: frozenset[str] = field(default_factory=frozenset)


def _p50_by_rank(extra: str = "") -> str:
    return (
        "histogram_quantile(0.5, sum by (le, ray_train_run_name, ray_train_worker_world_rank) "
        f"(rate(ray_mla_train_step_seconds_bucket{{{RUN}{extra}}}[$__rate_interval])))"
    )


STRAGGLER_EXPR = f"max by (ray_train_run_name) ({_p50_by_rank()}) / min by (ray_train_run_name) ({_p50_by_rank()})"
TOKENS_PER_S_EXPR = (
    f"sum by (ray_train_run_name) (rate(ray_mla_train_tokens_total{{{RUN}}}[$__rate_interval]))"
)
STEPS_PER_S_EXPR = (
    f"max by (ray_train_run_name) (deriv(ray_mla_train_step{{{RUN}}}[$__rate_interval]))"
)
ETA_EXPR = (
    f"(max by (ray_train_run_name) (ray_mla_train_total_steps{{{RUN}}}) - max by "
    f"(ray_train_run_name) (ray_mla_train_step{{{RUN}}})) / ({STEPS_PER_S_EXPR} > 0)"
)

ROWS: tuple[tuple[str, tuple[Panel, ...]], ...] = (
    (
        "Progress",
        (
            Panel(
                "Step",
                "Last optimizer step reported by any rank.",
                (
                    Target(
                        f"max by (ray_train_run_name) (ray_mla_train_step{{{RUN}}})",
                        "{{ray_train_run_name}}",
                    ),
                ),
                kind="stat",
                width=4,
            ),
            Panel(
                "ETA",
                "Steps left / step rate (deriv of the step gauge); empty while the step does not move.",
                (Target(ETA_EXPR, "{{ray_train_run_name}}"),),
                unit="s",
                kind="stat",
                width=4,
            ),
            Panel(
                "Loss",
                "Training loss (mean over the logging window) and validation loss, nats/token.",
                (
                    Target(f"ray_mla_train_loss{{{RUN}}}", "train {{ray_train_run_name}}"),
                    Target(f"ray_mla_train_val_loss{{{RUN}}}", "val {{ray_train_run_name}}"),
                ),
                width=16,
            ),
            Panel(
                "Tokens/s",
                "Global training throughput: rate of the tokens counter summed over ranks.",
                (Target(TOKENS_PER_S_EXPR, "{{ray_train_run_name}}"),),
            ),
            Panel(
                "Tokens seen",
                "Tokens trained so far (this Ray session).",
                (
                    Target(
                        f"sum by (ray_train_run_name) (ray_mla_train_tokens_total{{{RUN}}})",
                        "{{ray_train_run_name}}",
                    ),
                ),
            ),
            Panel(
                "Learning rate",
                "Learning rate of the last step.",
                (Target(f"ray_mla_train_lr{{{RUN}}}", "{{ray_train_run_name}}"),),
            ),
        ),
    ),
    (
        "Efficiency",
        (
            Panel(
                "Step time per rank (p50, p90)",
                "Quantiles of the per-step wall time from each rank's histogram; a slow rank stands out.",
                (
                    Target(_p50_by_rank(f", {RANK}"), "p50 rank {{ray_train_worker_world_rank}}"),
                    Target(
                        "histogram_quantile(0.9, sum by (le, ray_train_worker_world_rank) "
                        f"(rate(ray_mla_train_step_seconds_bucket{{{RUN}, {RANK}}}[$__rate_interval])))",
                        "p90 rank {{ray_train_worker_world_rank}}",
                    ),
                ),
                unit="s",
            ),
            Panel(
                "Straggler ratio",
                "Slowest rank's p50 step time / fastest rank's (1 = balanced).",
                (Target(STRAGGLER_EXPR, "{{ray_train_run_name}}"),),
            ),
            Panel(
                "MFU",
                "Model FLOPs utilisation: FLOPs/token x tokens/s / (peak x world size); the CPU "
                "peak is a rough 0.1 TFLOP/s per worker.",
                (Target(f"ray_mla_train_mfu{{{RUN}}}", "{{layout}}"),),
                unit="percentunit",
            ),
            Panel(
                "TFLOP/s per device",
                "Model FLOP/s achieved per worker: FLOPs/token x tokens/s / world size / 1e12.",
                (
                    Target(
                        f"max by (ray_train_run_name) (ray_mla_train_flops_per_token{{{RUN}}}) * "
                        f"{TOKENS_PER_S_EXPR} / max by (ray_train_run_name) "
                        f"(ray_mla_train_world_size{{{RUN}}}) / 1e12",
                        "{{ray_train_run_name}}",
                    ),
                ),
            ),
            Panel(
                "Mean step time per rank",
                "Sum / count of each rank's step-time histogram over the interval.",
                (
                    Target(
                        "sum by (ray_train_worker_world_rank) (rate(ray_mla_train_step_seconds_sum"
                        f"{{{RUN}, {RANK}}}[$__rate_interval])) / sum by (ray_train_worker_world_rank) "
                        f"(rate(ray_mla_train_step_seconds_count{{{RUN}, {RANK}}}[$__rate_interval]))",
                        "rank {{ray_train_worker_world_rank}}",
                    ),
                ),
                unit="s",
            ),
            Panel(
                "Data-wait share per rank",
                "Share of each rank's step time spent fetching batches (high: input-bound).",
                (
                    Target(
                        "sum by (ray_train_worker_world_rank) (rate(ray_mla_train_data_wait_seconds_total"
                        f"{{{RUN}, {RANK}}}[$__rate_interval])) / sum by (ray_train_worker_world_rank) "
                        f"(rate(ray_mla_train_step_seconds_sum{{{RUN}, {RANK}}}[$__rate_interval]))",
                        "rank {{ray_train_worker_world_rank}}",
                    ),
                ),
                unit="percentunit",
            ),
            Panel(
                "Gradient norm",
                "Global gradient 2-norm of the last step (before clipping).",
                (Target(f"ray_mla_train_grad_norm{{{RUN}}}", "{{ray_train_run_name}}"),),
            ),
        ),
    ),
    (
        "Memory",
        (
            Panel(
                "Peak memory per rank",
                "Peak device memory over each logging window (CPU workers: peak RSS).",
                (
                    Target(
                        "max by (ray_train_worker_world_rank) (ray_mla_train_device_memory_peak_bytes"
                        f"{{{RUN}, {RANK}}})",
                        "rank {{ray_train_worker_world_rank}}",
                    ),
                ),
                unit="bytes",
            ),
            Panel(
                "Node memory used",
                "Memory used on each Ray node (Ray's node metrics).",
                (Target("sum by (instance) (ray_node_mem_used)", "{{instance}}"),),
                unit="bytes",
            ),
            Panel(
                "GPU memory used",
                "GPU memory used per node (Ray's node metrics; GPU nodes only).",
                (Target("sum by (instance) (ray_node_gram_used)", "{{instance}}"),),
                unit="decmbytes",
                requires=frozenset({"gpu"}),
            ),
            Panel(
                "GPU utilisation",
                "GPU utilisation per node (GPU nodes only).",
                (Target("sum by (instance) (ray_node_gpus_utilization)", "{{instance}}"),),
                unit="percent",
                requires=frozenset({"gpu"}),
            ),
        ),
    ),
    (
        "Health",
        (
            Panel(
                "Controller state",
                "Ray Train controller state (1 = in that state); read with max_over_time, Ray "
                "resets it to 0 at shutdown.",
                (
                    Target(
                        "max by (ray_train_controller_state) (max_over_time(ray_train_controller_state"
                        f"{{{RUN}}}[$__rate_interval]))",
                        "{{ray_train_controller_state}}",
                    ),
                ),
            ),
            Panel(
                "World size and layout",
                "Ray Train workers of the current attempt, by layout (changes on an elastic re-plan).",
                (Target(f"max by (layout) (ray_mla_train_world_size{{{RUN}}})", "{{layout}}"),),
                width=4,
            ),
            Panel(
                "Resumes",
                "Worker-group starts that resumed from a checkpoint.",
                (
                    Target(
                        f"max by (ray_train_run_name) (ray_mla_train_resumes{{{RUN}}})",
                        "{{ray_train_run_name}}",
                    ),
                ),
                kind="stat",
                width=4,
            ),
            Panel(
                "Steps since checkpoint",
                "Last step minus the step of the last complete checkpoint.",
                (
                    Target(
                        f"max by (ray_train_run_name) (ray_mla_train_step{{{RUN}}}) - max by "
                        f"(ray_train_run_name) (ray_mla_checkpoint_last_step{{{RUN}}})",
                        "{{ray_train_run_name}}",
                    ),
                ),
                width=8,
            ),
            Panel(
                "Checkpoint save time",
                "Mean wall time of a checkpoint save over the interval.",
                (
                    Target(
                        f"sum(rate(ray_mla_checkpoint_seconds_sum{{{RUN}}}[$__rate_interval])) / "
                        f"sum(rate(ray_mla_checkpoint_seconds_count{{{RUN}}}[$__rate_interval]))",
                        "save",
                    ),
                ),
                unit="s",
            ),
            Panel(
                "Time blocked in ray.train.report",
                "Ray Train's cumulative time workers spent blocked in report(), per rank.",
                (
                    Target(
                        "max by (ray_train_worker_world_rank) (max_over_time("
                        f"ray_train_report_total_blocked_time_s{{{RUN}, {RANK}}}[$__rate_interval]))",
                        "rank {{ray_train_worker_world_rank}}",
                    ),
                ),
                unit="s",
                width=16,
            ),
        ),
    ),
    (
        "Attention",
        (
            Panel(
                "Mean gate per layer",
                "Mean MLA gate g at the last evaluation: the share of the local (sliding-window) "
                "branch; 1 - g goes to the global top-k branch.",
                (Target(f"ray_mla_attention_gate_mean{{{RUN}}}", "layer {{layer}}"),),
                unit="percentunit",
                width=24,
            ),
        ),
    ),
)
"""The project dashboard, row by row."""


def _variables() -> list[dict]:
    def query(name: str, label: str, expr: str, include_all: bool) -> dict:
        return {
            "name": name,
            "label": label,
            "type": "query",
            "datasource": DATASOURCE,
            "query": {"query": expr, "refId": f"{name}-variable"},
            "definition": expr,
            "refresh": 2,
            "includeAll": include_all,
            "allValue": ".*" if include_all else None,
            "multi": True,
            "sort": 3,
            "current": {},
        }

    return [
        {
            "name": "datasource",
            "label": "Prometheus",
            "type": "datasource",
            "query": "prometheus",
            "current": {},
        },
        query("run", "Run", "label_values(ray_mla_train_step, ray_train_run_name)", False),
        query(
            "rank",
            "Rank",
            f"label_values(ray_mla_train_step{{{RUN}}}, ray_train_worker_world_rank)",
            True,
        ),
    ]


def _panel_json(panel: Panel, panel_id: int, x: int, y: int) -> dict:
    return {
        "id": panel_id,
        "type": panel.kind,
        "title": panel.title,
        "description": panel.description,
        "datasource": DATASOURCE,
        "gridPos": {"x": x, "y": y, "w": panel.width, "h": panel.height},
        "fieldConfig": {"defaults": {"unit": panel.unit}, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom"}}
        if panel.kind == "timeseries"
        else {"reduceOptions": {"calcs": ["lastNotNull"]}},
        "targets": [
            {
                "refId": chr(ord("A") + i),
                "datasource": DATASOURCE,
                "expr": target.expr,
                "legendFormat": target.legend,
            }
            for i, target in enumerate(panel.targets)
        ],
        **({"tags": sorted(panel.requires)} if panel.requires else {}),
    }


def build_dashboard() -> dict:
    """The ``mla-train`` dashboard JSON (schemaVersion 39): a collapsed-free row panel per row,
    panels placed left to right and wrapped at 24 columns."""
    panels: list[dict] = []
    y, panel_id = 0, 1
    for title, row in ROWS:
        panels.append(
            {
                "id": panel_id,
                "type": "row",
                "title": title,
                "collapsed": False,
                "panels": [],
                "gridPos": {"x": 0, "y": y, "w": GRID_COLUMNS, "h": 1},
            }
        )
        panel_id, y, x, line_height = panel_id + 1, y + 1, 0, 0
        for panel in row:
            if x + panel.width > GRID_COLUMNS:
                x, y, line_height = 0, y + line_height, 0
            panels.append(_panel_json(panel, panel_id, x, y))
            panel_id, x, line_height = panel_id + 1, x + panel.width, max(line_height, panel.height)
        y += line_height
    return {
        "uid": DASHBOARD_UID,
        "title": "MLA training",
        "description": "One run-scoped view of an mla-train run: progress, efficiency, memory, "
        "health, attention (generated by `mla dashboards build`).",
        "tags": ["mla-train", "ray-train"],
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "graphTooltip": 1,
        "refresh": "10s",
        "time": {"from": "now-1h", "to": "now"},
        "timezone": "",
        "templating": {"list": _variables()},
        "annotations": {"list": []},
        "panels": panels,
    }


def iter_panels(dashboard: dict):
    """Every non-row panel of a dashboard JSON (row panels' nested ``panels`` included)."""
    for panel in dashboard.get("panels", []):
        if panel.get("type") == "row":
            yield from panel.get("panels", [])
        else:
            yield panel


# --------------------------------------------------------------------------- rules
RECORDING_RULES = {
    "run:mla_tokens_per_second:rate1m": (
        "sum by (ray_train_run_name) (rate(ray_mla_train_tokens_total[1m]))"
    ),
    "run:mla_straggler_ratio:p50_1m": (
        "max by (ray_train_run_name) (run_rank:mla_step_seconds:p50_1m) / min by "
        "(ray_train_run_name) (run_rank:mla_step_seconds:p50_1m)"
    ),
    "run_rank:mla_step_seconds:p50_1m": (
        "histogram_quantile(0.5, sum by (le, ray_train_run_name, ray_train_worker_world_rank) "
        "(rate(ray_mla_train_step_seconds_bucket[1m])))"
    ),
    "run:mla_mfu:rate1m": (
        "max by (ray_train_run_name) (ray_mla_train_flops_per_token) * "
        "run:mla_tokens_per_second:rate1m / (max by (ray_train_run_name) "
        "(ray_mla_train_device_peak_flops) * max by (ray_train_run_name) (ray_mla_train_world_size))"
    ),
    "run:mla_eta_seconds:deriv5m": (
        "(max by (ray_train_run_name) (ray_mla_train_total_steps) - max by (ray_train_run_name) "
        "(ray_mla_train_step)) / (max by (ray_train_run_name) (deriv(ray_mla_train_step[5m])) > 0)"
    ),
}
"""Derived quantities, unit-tested with ``promtool test rules`` (tests/promtool/)."""

ALERTS = (
    {
        "alert": "MLATrainingStalled",
        "expr": "max by (ray_train_run_name) (changes(ray_mla_train_step[15m])) == 0 and on "
        "(ray_train_run_name) max by (ray_train_run_name) "
        '(ray_train_controller_state{ray_train_controller_state="RUNNING"}) == 1',
        "for": "5m",
        "severity": "critical",
        "summary": "Run {{ $labels.ray_train_run_name }} has not finished a step in 15 minutes "
        "while its controller is RUNNING",
    },
    {
        "alert": "MLALossNotFinite",
        "expr": "ray_mla_train_loss != ray_mla_train_loss or abs(ray_mla_train_loss) > 1e30",
        "for": "0m",
        "severity": "critical",
        "summary": "Training loss of {{ $labels.ray_train_run_name }} is not finite",
    },
    {
        "alert": "MLAStraggler",
        "expr": "run:mla_straggler_ratio:p50_1m > 1.5",
        "for": "10m",
        "severity": "warning",
        "summary": "The slowest rank of {{ $labels.ray_train_run_name }} takes {{ $value }}x "
        "the fastest one's p50 step time",
    },
    {
        "alert": "MLAWorkerRestarts",
        "expr": "max by (ray_train_run_name) (max_over_time(ray_mla_train_resumes[1h])) - max by "
        "(ray_train_run_name) (min_over_time(ray_mla_train_resumes[1h])) > 2",
        "for": "0m",
        "severity": "warning",
        "summary": "Run {{ $labels.ray_train_run_name }} resumed more than twice in an hour",
    },
    {
        "alert": "MLACheckpointStale",
        "expr": "max by (ray_train_run_name) (changes(ray_mla_checkpoint_last_step[2h])) == 0 "
        "and on (ray_train_run_name) max by (ray_train_run_name) "
        "(changes(ray_mla_train_step[2h])) > 0",
        "for": "0m",
        "severity": "warning",
        "summary": "Run {{ $labels.ray_train_run_name }} trains but has not checkpointed in 2 hours",
    },
)
"""Alerts of the PrometheusRule (``../shared/anchors/observability/REPORT.md`` §3.8)."""


def build_rules() -> dict:
    """Prometheus rule groups (``rule_files`` format, also a PrometheusRule's ``spec``)."""
    return {
        "groups": [
            {
                "name": "mla-train.derived",
                "rules": [{"record": k, "expr": v} for k, v in RECORDING_RULES.items()],
            },
            {
                "name": "mla-train.alerts",
                "rules": [
                    {
                        "alert": a["alert"],
                        "expr": a["expr"],
                        "for": a["for"],
                        "labels": {"severity": a["severity"]},
                        "annotations": {"summary": a["summary"]},
                    }
                    for a in ALERTS
                ],
            },
        ]
    }


# --------------------------------------------------------------------------- files
PROVISIONING_DATASOURCE = {
    "apiVersion": 1,
    "datasources": [
        {
            "name": "Prometheus",
            "type": "prometheus",
            "uid": "prometheus",
            "access": "proxy",
            "url": "http://127.0.0.1:9090",
            "isDefault": True,
        }
    ],
}
PROVISIONING_DASHBOARDS = {
    "apiVersion": 1,
    "providers": [
        {
            "name": "mla-train",
            "folder": "mla-train",
            "type": "file",
            "allowUiUpdates": False,
            "options": {
                "path": "/etc/grafana/dashboards/mla-train",
                "foldersFromFilesStructure": True,
            },
        }
    ],
}


def _json_text(data: dict) -> str:
    return json.dumps(data, indent=2, sort_keys=True) + "\n"


def _ray_dashboards() -> dict[str, str]:
    """Ray's own Train and Default dashboards as the installed Ray generates them."""
    from ray.dashboard.modules.metrics import grafana_dashboard_factory as factory

    return {
        "ray/train.json": _json_text(json.loads(factory.generate_train_grafana_dashboard()[0])),
        "ray/default.json": _json_text(json.loads(factory.generate_default_grafana_dashboard()[0])),
    }


def build_files() -> dict[str, str]:
    """Path relative to the repository root -> text, for every generated file: ``dashboards/``
    and the KubeRay monitoring manifests ``k8s/monitoring/``."""
    dashboards = {
        "mla-train.json": _json_text(build_dashboard()),
        "prometheus/rules.yml": yaml.safe_dump(build_rules(), sort_keys=False, width=1000),
        "provisioning/datasources/prometheus.yaml": yaml.safe_dump(
            PROVISIONING_DATASOURCE, sort_keys=False
        ),
        "provisioning/dashboards/mla-train.yaml": yaml.safe_dump(
            PROVISIONING_DASHBOARDS, sort_keys=False
        ),
        **_ray_dashboards(),
    }
    files = {f"dashboards/{rel}": text for rel, text in dashboards.items()}
    json_files = {rel: text for rel, text in dashboards.items() if rel.endswith(".json")}
    files.update(monitoring_manifests(json_files))
    return files


def monitoring_manifests(dashboards: dict[str, str]) -> dict[str, str]:
    """``k8s/monitoring/*.yaml``: PodMonitors, the PrometheusRule, one dashboard ConfigMap each.

    Modelled on KubeRay's ``config/prometheus/podMonitor.yaml`` (``release: prometheus`` so that
    kube-prometheus-stack selects them; the ``metrics`` port 8080 the operator adds to every Ray
    pod, plus the head's ``as-metrics``/``dash-metrics`` that ``mla k8s render`` declares) and its ``install.sh --auto-load-dashboard`` (one ConfigMap per dashboard, label
    ``grafana_dashboard: "1"``: a single one would pass the 1 MiB object limit).
    """

    def dump(docs: list[dict]) -> str:
        return "---\n".join(yaml.safe_dump(d, sort_keys=False, width=1000) for d in docs)

    labels = {"app.kubernetes.io/name": "mla-train", "release": "prometheus"}
    monitors = [
        {
            "apiVersion": "monitoring.coreos.com/v1",
            "kind": "PodMonitor",
            "metadata": {"name": f"mla-train-ray-{node}", "labels": labels},
            "spec": {
                "jobLabel": f"ray-{node}",
                "selector": {"matchLabels": {"ray.io/node-type": node}},
                "podMetricsEndpoints": [
                    {
                        "port": port,
                        "interval": "15s",
                        "relabelings": [
                            {
                                "action": "replace",
                                "sourceLabels": ["__meta_kubernetes_pod_label_ray_io_cluster"],
                                "targetLabel": "ray_io_cluster",
                            }
                        ],
                    }
                    for port in (
                        ("metrics", "as-metrics", "dash-metrics")
                        if node == "head"
                        else ("metrics",)
                    )
                ],
            },
        }
        for node in ("head", "worker")
    ]
    rule = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "mla-train", "labels": labels},
        "spec": build_rules(),
    }
    config_maps = [
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {
                "name": "mla-train-dashboard-" + rel.removesuffix(".json").replace("/", "-"),
                "labels": {"app.kubernetes.io/name": "mla-train", "grafana_dashboard": "1"},
            },
            "data": {rel.replace("/", "-"): text},
        }
        for rel, text in sorted(dashboards.items())
    ]
    return {
        "k8s/monitoring/podmonitors.yaml": dump(monitors),
        "k8s/monitoring/prometheusrule.yaml": dump([rule]),
        "k8s/monitoring/dashboards.yaml": dump(config_maps),
    }


def write_files(folder: Path, files: dict[str, str]) -> list[Path]:
    """Write ``files`` under ``folder`` (each atomically); returns the paths written."""
    from orchestrator.contract.io import atomic_write

    written = []
    for rel, text in files.items():
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, text)
        written.append(path)
    return written


def stale_files(folder: Path, files: dict[str, str]) -> list[str]:
    """Relative paths whose content under ``folder`` differs from ``files`` (or is missing)."""
    return [
        rel
        for rel, text in files.items()
        if not (folder / rel).is_file() or (folder / rel).read_text() != text
    ]
