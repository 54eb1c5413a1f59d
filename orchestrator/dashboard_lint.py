"""Structural lint of a Grafana dashboard JSON (no Grafana server can run here).

Grafana's own schema libraries accept broken JSON (``gridPos: "oops"``) or reject Ray's legacy
dashboards, so the checks that matter are spelled out here
(``../shared/anchors/observability/REPORT.md`` §1.7, §3.4): unique panel ids, integer grid
positions inside 24 columns without overlaps, a ``refId`` and an expression per target, only
defined variables, the ``${datasource}`` variable as every datasource, known units, and only
metrics that someone exports.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

GRAFANA_BUILTINS = frozenset({"__rate_interval", "__interval", "__range", "__interval_ms"})
KNOWN_UNITS = frozenset(
    {"short", "s", "ms", "bytes", "decbytes", "decmbytes", "percent", "percentunit", "none"}
)
_VAR = re.compile(r"\$\{?(\w+)(?::\w+)?\}?")
_IDENT = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")


def metric_names(expr: str) -> set[str]:
    """Metric names an expression reads: identifiers outside label matchers, strings, ranges and
    ``by/without/on/ignoring (...)`` groupings that are not PromQL functions or keywords.

    Example: ``sum by (le) (rate(ray_mla_train_step_seconds_bucket{run="a"}[1m]))`` ->
    ``{"ray_mla_train_step_seconds_bucket"}``.
    """
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for match in _IDENT.finditer(text):
        rest = text[match.end() :].lstrip()
        if rest.startswith("("):  # a function call
            continue
        word = match.group(0)
        if word in _KEYWORDS or text[max(0, match.start() - 1)].isdigit():
            continue
        names.add(word)
    return names


_KEYWORDS = frozenset(
    {"and", "or", "unless", "bool", "offset", "le", "e", "inf", "nan", "Inf", "NaN"}
)


def _panels(dashboard: dict) -> Iterable[dict]:
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def _overlaps(a: dict, b: dict) -> bool:
    return (
        a["x"] < b["x"] + b["w"]
        and b["x"] < a["x"] + a["w"]
        and a["y"] < b["y"] + b["h"]
        and b["y"] < a["y"] + a["h"]
    )


def _grid_problems(panels: list[dict]) -> list[str]:
    problems: list[str] = []
    placed: list[tuple[str, dict]] = []
    for panel in panels:
        grid = panel.get("gridPos")
        name = f"panel {panel.get('id')} ({panel.get('title')!r})"
        if not isinstance(grid, dict) or not all(
            isinstance(grid.get(k), int) and grid[k] >= 0 for k in ("x", "y", "w", "h")
        ):
            problems.append(f"{name}: gridPos {grid!r} needs non-negative integers x, y, w, h")
            continue
        if grid["w"] < 1 or grid["x"] + grid["w"] > 24:
            problems.append(f"{name}: x + w = {grid['x'] + grid['w']} outside 24 columns")
        for other_name, other in placed:
            if _overlaps(grid, other):
                problems.append(f"{name} overlaps {other_name}")
        placed.append((name, grid))
    return problems


def lint_dashboard(dashboard: dict, known_metrics: frozenset[str]) -> list[str]:
    """Problems of ``dashboard`` (empty when it passes).

    Args:
        dashboard: Grafana dashboard JSON.
        known_metrics: Metric names that are exported (the workers' and Ray's).
    """
    panels = list(_panels(dashboard))
    problems = _grid_problems(panels)
    ids = [str(p.get("id")) for p in panels]
    problems += [
        f"panel id {i} is used twice" for i in sorted({i for i in ids if ids.count(i) > 1})
    ]
    variables = {v["name"] for v in dashboard.get("templating", {}).get("list", [])}
    if "datasource" not in variables:
        problems.append("no `datasource` variable")
    for panel in panels:
        if panel.get("type") == "row":
            continue
        name = f"panel {panel.get('id')} ({panel.get('title')!r})"
        problems += _panel_problems(name, panel, variables, known_metrics)
    return problems


def _panel_problems(
    name: str, panel: dict, variables: set[str], known_metrics: frozenset[str]
) -> list[str]:
    problems = []
    unit = panel.get("fieldConfig", {}).get("defaults", {}).get("unit")
    if unit not in KNOWN_UNITS:
        problems.append(f"{name}: unit {unit!r} is not one of {sorted(KNOWN_UNITS)}")
    targets = panel.get("targets", [])
    if not targets:
        problems.append(f"{name}: no targets")
    ref_ids = [t.get("refId") for t in targets]
    if any(not r for r in ref_ids) or len(set(ref_ids)) != len(ref_ids):
        problems.append(f"{name}: refIds {ref_ids} must be set and unique")
    for source in [panel.get("datasource"), *(t.get("datasource") for t in targets)]:
        if not isinstance(source, dict) or source.get("uid") != "${datasource}":
            problems.append(f"{name}: datasource {source!r} is not the ${{datasource}} variable")
    for target in targets:
        expr = target.get("expr") or ""
        if not expr.strip():
            problems.append(f"{name}: target {target.get('refId')} has no expr")
        for var in _VAR.findall(expr):
            if var not in variables and var not in GRAFANA_BUILTINS:
                problems.append(f"{name}: ${var} is not a dashboard variable")
        for metric in sorted(metric_names(expr) - known_metrics):
            problems.append(f"{name}: metric {metric} is exported by neither the workers nor Ray")
    return problems


def ray_metric_names(dashboards: Iterable[dict]) -> frozenset[str]:
    """Metric names that Ray's own dashboards query (what Ray exports, as the pinned Ray
    knows it)."""
    names: set[str] = set()
    for dashboard in dashboards:
        for panel in _panels(dashboard):
            for target in panel.get("targets", []):
                names |= {n for n in metric_names(target.get("expr", "")) if n.startswith("ray_")}
    return frozenset(names)
