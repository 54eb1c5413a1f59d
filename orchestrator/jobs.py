"""Submit training jobs (and sweeps) to a Ray cluster through Ray's Job Submission API.

``mla submit CONFIG --address http://HOST:8265`` validates the config on the client, stages the
project code plus the resolved job YAML as the job's ``working_dir`` (virtual environments, run
folders, checkpoints and caches excluded) and starts ``python -m orchestrator.cli train job.yaml``
on the cluster, where the run folder lives under ``cluster.storage_path`` so that a resubmitted
job with the same ``run.name`` resumes. ``cluster.runtime_env`` joins the code upload in the job's
runtime env (:mod:`orchestrator.runtime_env`), and a small preflight job with the same runtime env
checks every node's Python and the job's paths first (:mod:`orchestrator.preflight`).

Token authentication (on by default in Ray 2.60): the token is read the way Ray reads it
(``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH``, else ``~/.ray/auth_token``) or from ``--token-file``;
it is sent as a header by Ray's client and never printed.
"""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import shutil
import tempfile
import time
from pathlib import Path

import yaml

from orchestrator.config import JobConfig, load_job_config
from orchestrator.contract.errors import ClusterError, ConfigError, JobFailedError
from orchestrator.runtime_env import WORKING_DIR_EXCLUDES, build_runtime_env, driver_python

PROJECT_ROOT = Path(__file__).resolve().parents[1]
_CODE = ["mla", "workers", "orchestrator", "benchmarks", "configs", "pyproject.toml"]
DEFAULT_STORAGE = "/tmp/mla-runs"
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def resolve_address(address: str | None) -> str:
    """``--address`` or ``RAY_ADDRESS``; a bare ``host:port`` gets ``http://``.

    Raises:
        ClusterError: neither is set.
    """
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        raise ClusterError(
            "no Ray cluster address: pass --address http://HOST:8265 or set RAY_ADDRESS "
            "(start a cluster with `ray start --head`)"
        )
    if "://" not in address:
        address = f"http://{address}"
    return address


def configure_token(token_file: str | None) -> bool:
    """Point Ray's client at the auth token and turn token mode on when a token exists.

    Returns:
        Whether token authentication will be used. The token itself is never read here.

    Raises:
        ClusterError: ``token_file`` does not exist.
    """
    if token_file:
        path = Path(token_file).expanduser()
        if not path.is_file():
            raise ClusterError(
                f"--token-file {str(path)!r} does not exist; get the token with "
                "`ray get-auth-token` on the head node"
            )
        os.environ["RAY_AUTH_TOKEN_PATH"] = str(path)
    has_token = bool(
        os.environ.get("RAY_AUTH_TOKEN")
        or os.environ.get("RAY_AUTH_TOKEN_PATH")
        or (Path.home() / ".ray" / "auth_token").is_file()
    )
    if has_token and "RAY_AUTH_MODE" not in os.environ:
        os.environ["RAY_AUTH_MODE"] = "token"
    return has_token


def connect(address: str | None, token_file: str | None = None):
    """A ``JobSubmissionClient`` for the cluster.

    Raises:
        ClusterError: the dashboard cannot be reached or refused the token; the message says
            what was tried and how to start a cluster.
    """
    url = resolve_address(address)
    configure_token(token_file)  # before Ray is imported: Ray reads the auth mode once
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(url)
    except Exception as exc:  # ConnectionError, RuntimeError with HTTP details
        reason = _first_line(exc).rstrip(".")
        if "authentication" in reason.lower():
            raise ClusterError(
                f"the Ray cluster at {url} refused the auth token ({reason}); pass the "
                "cluster's token with --token-file (`ray get-auth-token` on the head node) "
                "or set RAY_AUTH_TOKEN_PATH"
            ) from None
        raise ClusterError(
            f"cannot reach the Ray cluster at {url} ({reason}). Start one with "
            "`ray start --head` (needs ray[default]) and pass its dashboard address "
            "(port 8265), or check RAY_ADDRESS"
        ) from None


def stage_code(stage: Path) -> None:
    """Copy the project code (without :data:`WORKING_DIR_EXCLUDES`) into ``stage``."""
    ignore = shutil.ignore_patterns(*WORKING_DIR_EXCLUDES)
    for name in _CODE:
        src = PROJECT_ROOT / name
        if src.is_dir():
            shutil.copytree(src, stage / name, ignore=ignore)
        elif src.is_file():
            shutil.copy2(src, stage / name)


def stage_working_dir(job: JobConfig, stage: Path) -> Path:
    """Copy the project code (without excluded paths) and write the resolved job YAML.

    Returns:
        The staged ``job.yaml`` path (relative name ``job.yaml`` inside ``stage``).
    """
    stage_code(stage)
    job_yaml = stage / "job.yaml"
    job_yaml.write_text(yaml.safe_dump(job.model_dump(mode="json"), sort_keys=False))
    return job_yaml


def prepare_cluster_job(config: str, overrides: list[str], storage_path: str | None) -> JobConfig:
    """Validate on the client and point the job at the cluster and its shared storage.

    Raises:
        ConfigError: the config is invalid (nothing is submitted).
    """
    job = load_job_config(config, overrides)
    job.model_config_()  # model consistency is checked before submitting
    storage = storage_path or job.cluster.storage_path or DEFAULT_STORAGE
    data = job.model_dump(mode="json")
    data["cluster"] = {**data["cluster"], "address": "auto", "storage_path": storage}
    return JobConfig.model_validate(data)


def submit(
    config: str,
    overrides: list[str],
    address: str | None,
    token_file: str | None = None,
    storage_path: str | None = None,
    entrypoint_args: list[str] | None = None,
    command: str = "train",
    submission_id: str | None = None,
    preflight: bool = True,
) -> tuple[object, str]:
    """Check the cluster's Python (:mod:`orchestrator.preflight`), then submit
    ``mla COMMAND job.yaml`` to the cluster; returns ``(client, submission_id)``.

    The code upload and ``cluster.runtime_env`` make one runtime env, used by the preflight job
    and the training job alike (Ray uploads the package once).

    Raises:
        ConfigError: the config is invalid.
        ClusterError: the cluster cannot be reached, refused the job, or its Python (or the
            job's paths) failed the preflight: nothing was started then.
    """
    from orchestrator.preflight import EXPECT_FILE, check_result, expectations, run_preflight_job

    explicit_storage = bool(storage_path or load_job_config(config, overrides).cluster.storage_path)
    job = prepare_cluster_job(config, overrides, storage_path)
    client = connect(address, token_file)
    sid = submission_id or f"mla-{job.run.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    python = driver_python(job.cluster)
    with tempfile.TemporaryDirectory(prefix="mla-submit-") as tmp:
        stage_working_dir(job, Path(tmp))
        runtime_env = build_runtime_env(job.cluster, working_dir=tmp)
        if preflight:
            expect = expectations(job, check_storage=explicit_storage)
            (Path(tmp) / EXPECT_FILE).write_text(json.dumps(expect.probe_input()))
            check_result(
                expect,
                run_preflight_job(
                    client, expect, runtime_env, python, f"{sid}-preflight", _submit_with_retry
                ),
            )
        args = " ".join(shlex.quote(a) for a in ["--no-preflight", *(entrypoint_args or [])])
        entrypoint = f"{python} -m orchestrator.cli {command} job.yaml {args}".strip()
        _submit_with_retry(
            client,
            entrypoint=entrypoint,
            submission_id=sid,
            runtime_env=runtime_env,
            metadata={"mla_run": job.run.name, "mla_command": command},
        )
    return client, sid


def _submit_with_retry(client, retry_s: float = 180.0, **kwargs) -> None:
    """``client.submit_job`` that waits while a freshly started head has no job agent yet
    (Ray answers HTTP 500 "No available agent ... try again later").

    Raises:
        ClusterError: the cluster refused the job for another reason, or kept refusing.
    """
    deadline = time.time() + retry_s
    while True:
        try:
            client.submit_job(**kwargs)
            return
        except Exception as exc:
            reason = _first_line(exc)
            if "try again later" not in reason or time.time() > deadline:
                raise ClusterError(f"the cluster refused the job: {reason}") from None
            time.sleep(2)


def follow(client, submission_id: str, echo) -> str:
    """Stream the job's logs through ``echo(line)`` until it ends; returns its final status.

    Raises:
        JobFailedError: the job FAILED or was STOPPED (status, message and last log lines).
    """

    async def _tail() -> None:
        async for chunk in client.tail_job_logs(submission_id):
            for line in chunk.splitlines():
                echo(line)

    asyncio.run(_tail())
    status = wait_terminal(client, submission_id)
    if status != "SUCCEEDED":
        info = client.get_job_info(submission_id)
        tail = "\n".join(client.get_job_logs(submission_id).splitlines()[-15:])
        raise JobFailedError(
            f"job {submission_id} {status}: {info.message or 'no message'}\nlast log lines:\n{tail}"
        )
    return status


def wait_terminal(client, submission_id: str, timeout_s: float = 60.0) -> str:
    """Poll until the job is SUCCEEDED, FAILED or STOPPED (after its logs ended)."""
    deadline = time.time() + timeout_s
    while True:
        status = str(client.get_job_status(submission_id).value)
        if status in TERMINAL or time.time() > deadline:
            return status
        time.sleep(0.5)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def require_known_job(client, submission_id: str):
    """``get_job_info`` with a clear error for an unknown id.

    Raises:
        ConfigError: no job with that id (says how to list the known ones).
    """
    try:
        return client.get_job_info(submission_id)
    except Exception as exc:
        raise ConfigError(
            f"no job {submission_id!r} on this cluster ({_first_line(exc)}); see `mla jobs list`"
        ) from None
