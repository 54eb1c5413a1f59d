"""The Ray runtime env of a cluster job: the uploaded project code merged with
``cluster.runtime_env``, which reaches Ray unchanged.

Ray applies a job's runtime env to its driver's tasks and actors (the Ray Train workers), but
its entrypoint is a shell command: with ``py_executable`` the entrypoint runs under that Python
too (:func:`driver_python`), so driver and workers use one environment.
"""

from __future__ import annotations

import shlex

from orchestrator.config import ClusterSection, RuntimeEnvSection

#: Never uploaded with the job: environments, run outputs, checkpoints, caches, VCS data.
WORKING_DIR_EXCLUDES = [
    ".venv",
    "venv",
    "env",
    "runs",
    "ray_results",
    "checkpoints",
    "*.egg-info",
    ".git",
    "__pycache__",
    ".pytest_cache",
    "*.pt",
    "*.pth",
    "*.safetensors",
    ".mypy_cache",
    "k8s/crds",
]


def build_runtime_env(cluster: ClusterSection, working_dir: str | None) -> dict:
    """``cluster.runtime_env`` as Ray takes it, plus the code upload.

    Args:
        cluster: the job's cluster section.
        working_dir: local folder uploaded as the job's ``working_dir`` (None: no upload).

    Returns:
        The runtime env dict: the user's fields unchanged, ``working_dir`` and ``excludes`` for
        the code, and ``config.setup_timeout_seconds`` so that an install that hangs fails the
        job with the runtime-env logs instead of leaving it PENDING.

    Example:
        >>> from orchestrator.config import ClusterSection
        >>> build_runtime_env(ClusterSection(runtime_env={"pip": ["emoji"]}), "/tmp/code")["pip"]
        ['emoji']
    """
    env = (cluster.runtime_env or RuntimeEnvSection()).to_ray()
    if working_dir is not None:
        env["working_dir"] = working_dir
        env["excludes"] = list(WORKING_DIR_EXCLUDES)
    return env


def driver_python(cluster: ClusterSection) -> str:
    """The command that starts Python in the job's entrypoint: ``runtime_env.py_executable``
    (it may carry arguments, e.g. ``uv run``), else ``python`` from the node's ``PATH`` (which a
    ``pip``/``uv`` runtime env points at its virtualenv)."""
    py = cluster.runtime_env.py_executable if cluster.runtime_env else None
    if not py:
        return "python"
    return " ".join(shlex.quote(part) for part in shlex.split(py))
