"""`cluster.runtime_env`: validated at the boundary, passed to Ray unchanged next to the code
upload, with a setup timeout; Ray's own RuntimeEnv accepts the result."""

from __future__ import annotations

import pytest

from orchestrator.config import load_job_config
from orchestrator.contract.errors import ConfigError
from orchestrator.runtime_env import WORKING_DIR_EXCLUDES, build_runtime_env, driver_python


def _cluster(*sets: str):
    return load_job_config("configs/tiny.yaml", list(sets)).cluster


def test_user_fields_reach_ray_unchanged_next_to_the_code_and_the_setup_timeout():
    cluster = _cluster(
        "cluster.runtime_env.pip=[emoji==2.8.0, 'pyjokes>=0.6']",
        "cluster.runtime_env.env_vars={NCCL_DEBUG: INFO}",
        "cluster.runtime_env.setup_timeout_s=120",
    )
    env = build_runtime_env(cluster, working_dir="/tmp/code")
    assert env == {
        "pip": ["emoji==2.8.0", "pyjokes>=0.6"],
        "env_vars": {"NCCL_DEBUG": "INFO"},
        "config": {"setup_timeout_seconds": 120},
        "working_dir": "/tmp/code",
        "excludes": WORKING_DIR_EXCLUDES,
    }


def test_ray_accepts_the_runtime_env():
    from ray.runtime_env import RuntimeEnv

    cluster = _cluster("cluster.runtime_env.uv=[emoji]", "cluster.runtime_env.env_vars={A: b}")
    env = RuntimeEnv(**build_runtime_env(cluster, working_dir=None))
    assert env.uv_config()["packages"] == ["emoji"] and env.env_vars() == {"A": "b"}
    assert env["config"]["setup_timeout_seconds"] == 600


def test_without_runtime_env_only_the_code_and_the_timeout_are_set():
    env = build_runtime_env(_cluster(), working_dir="/tmp/code")
    assert set(env) == {"working_dir", "excludes", "config"}


def test_py_executable_also_starts_the_driver():
    assert driver_python(_cluster()) == "python"
    assert (
        driver_python(_cluster("cluster.runtime_env.py_executable=/opt/venv/bin/python"))
        == "/opt/venv/bin/python"
    )
    assert driver_python(_cluster("cluster.runtime_env.py_executable='uv run'")) == "uv run"


def test_a_typo_in_runtime_env_names_the_allowed_keys():
    with pytest.raises(
        ConfigError,
        match=r"runtime_env.env_var: unknown key 'env_var' \(did you mean 'env_vars'\?\)",
    ):
        _cluster("cluster.runtime_env.env_var={A: b}")
