"""What the cluster's Python can run: the probe that ``mla`` runs on a Ray cluster before training.

This module runs *on the cluster*, in whatever Python the cluster (or the job's runtime env)
gives, so it imports only the standard library and Ray: it must work exactly where the project's
dependencies are missing. :mod:`orchestrator.preflight` (the submitter's side) decides what the
reports mean.

Two ways in:

- ``python -m orchestrator.cluster_probe EXPECT.json`` is the entrypoint of the small preflight job
  that ``mla submit`` sends through the Job Submission API with the job's own runtime env. It
  runs :func:`probe_node` once on every alive node (a zero-CPU task pinned to the node) and prints
  one line ``MLA_PREFLIGHT_REPORT {json}``.
- :func:`probe_cluster` does the same from a driver that is already connected (``mla train``
  with ``cluster.address``, ``mla tune --address``).

``EXPECT.json`` holds ``{"distributions": [names], "imports": [modules], "paths": {label: path},
"use_gpu": bool}``.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import platform
import socket
import sys
import traceback
from importlib import metadata

MARKER = "MLA_PREFLIGHT_REPORT "
"""Prefix of the report line in the preflight job's logs."""


def probe_node(expect: dict) -> dict:
    """Check this process's Python against ``expect`` and return what it found.

    Args:
        expect: ``distributions`` (names whose installed versions are wanted), ``imports``
            (modules to import, tried only when every distribution is installed), ``paths``
            (label -> path whose existence is wanted, relative paths against the current
            working directory, which in a Ray job is its ``working_dir``), ``use_gpu``.

    Returns:
        ``{"host", "ip", "python", "python_version", "distributions": {name: version or None},
        "import_error": str or None, "paths": {label: bool}, "cuda": {...} or None}``.
    """
    found = {name: _version(name) for name in expect.get("distributions", [])}
    report = {
        "host": socket.gethostname(),
        "ip": _node_ip(),
        "python": sys.executable,
        "python_version": platform.python_version(),
        "cwd": os.getcwd(),
        "distributions": found,
        "import_error": None,
        "paths": {k: os.path.exists(v) for k, v in expect.get("paths", {}).items()},
        "cuda": None,
    }
    if all(v is not None for v in found.values()):
        report["import_error"] = _import_all(expect.get("imports", []))
    if expect.get("use_gpu") and report["import_error"] is None and found.get("torch"):
        report["cuda"] = _cuda()
    return report


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _node_ip() -> str:
    try:
        import ray

        return ray.util.get_node_ip_address()
    except Exception:  # not inside Ray, or Ray cannot tell
        return socket.gethostname()


def _import_all(modules: list[str]) -> str | None:
    for name in modules:
        try:
            importlib.import_module(name)
        except BaseException as exc:  # a broken install may raise anything, even SystemExit
            return f"import {name}: {type(exc).__name__}: {exc}".strip()
    return None


def _cuda() -> dict:
    import torch

    return {
        "available": bool(torch.cuda.is_available()),
        "devices": int(torch.cuda.device_count()),
        "torch_cuda": torch.version.cuda,
        "visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
    }


def probe_cluster(expect: dict, timeout_s: float = 300.0) -> dict:
    """Run :func:`probe_node` on every alive node of the connected Ray cluster.

    Each probe is a task with ``num_cpus=0`` pinned to its node (hard node affinity), so it runs
    even while the node's CPUs are taken, in the job's runtime env.

    Returns:
        ``{"nodes": [{"node_id", "resources", "report"} ...], "errors": [{"node_id", "ip",
        "error"} ...]}``; a node whose probe could not run at all (its worker failed to start,
        the runtime env failed) lands in ``errors`` with Ray's message.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    remote = ray.remote(num_cpus=0, max_retries=0)(probe_node)
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    refs = {
        n["NodeID"]: remote.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
        ).remote(expect)
        for n in nodes
    }
    out: dict = {"nodes": [], "errors": []}
    for node in nodes:
        node_id = node["NodeID"]
        resources = {k: v for k, v in node.get("Resources", {}).items() if k in ("CPU", "GPU")}
        try:
            report = ray.get(refs[node_id], timeout=timeout_s)
            out["nodes"].append({"node_id": node_id, "resources": resources, "report": report})
        except Exception as exc:  # RuntimeEnvSetupError, GetTimeoutError, WorkerCrashedError...
            out["errors"].append(
                {
                    "node_id": node_id,
                    "ip": node.get("NodeManagerAddress"),
                    "error": _last_lines(str(exc) or type(exc).__name__, 20),
                }
            )
    return out


def _last_lines(text: str, n: int) -> str:
    return "\n".join(text.strip().splitlines()[-n:])


def main(argv: list[str] | None = None) -> int:
    """Entrypoint of the preflight job: probe the driver and every node, print the report line."""
    argv = sys.argv[1:] if argv is None else argv
    with open(argv[0]) as fh:
        expect = json.load(fh)
    result: dict = {"driver": probe_node(expect)}
    try:
        import ray

        ray.init(address="auto", logging_level=logging.WARNING, log_to_driver=False)
        result.update(probe_cluster(expect, timeout_s=float(expect.get("timeout_s", 300))))
    except Exception:
        result["cluster_error"] = _last_lines(traceback.format_exc(), 20)
    print(MARKER + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
