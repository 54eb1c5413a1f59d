"""A real two-node Ray cluster whose `python` lacks the project (a bare virtual environment with
only `ray[default]`, first on PATH when `ray start` runs): `mla submit` stops before any worker
starts with one message naming the missing packages, the nodes and the fixes; a runtime-env
install that hangs fails after `setup_timeout_s` with Ray's message; the same submit
with `cluster.runtime_env.py_executable` pointing at a working environment trains; a data path
that exists only on the submitting machine fails the preflight naming the path."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

from tests.harness.cli import FAST_OVERRIDES, MlaCli
from tests.ray_cluster import HEAD_IP, SECOND_IP, ray_cluster

mla = MlaCli()


def sets(*items: str) -> list[str]:
    """``--set`` arguments: the fast overrides, then ``items`` (the later one wins)."""
    return [a for s in (*FAST_OVERRIDES, *items) for a in ("--set", s)]


CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml")
#: The environment that runs these tests has the whole project: the working runtime env.
WORKING_PYTHON = Path(sys.executable)


@pytest.fixture(scope="session")
def bare_bin(tmp_path_factory) -> Path:
    """``bin/`` of a fresh virtual environment with nothing but ``ray[default]`` (pip takes it
    from its cache or the local index)."""
    venv = tmp_path_factory.mktemp("bare") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    subprocess.run(
        [
            str(venv / "bin" / "python"),
            "-m",
            "pip",
            "install",
            "--quiet",
            f"ray[default]=={metadata.version('ray')}",
        ],
        check=True,
        timeout=900,
    )
    return venv / "bin"


@pytest.mark.slow
def test_preflight_names_what_the_cluster_python_lacks_and_a_runtime_env_fixes_it(
    tmp_path, bare_bin
):
    storage = tmp_path / "storage"
    storage.mkdir()
    with ray_cluster(tmp_path, bin_dir=bare_bin) as cluster:
        auth = ["--address", cluster.address, "--token-file", str(cluster.token_file)]
        bare = mla(
            "submit",
            CONFIG,
            *auth,
            "--storage-path",
            str(storage),
            *sets("train.steps=4", "run.name=bare"),
        )
        assert bare.returncode == 2, bare.stderr[-3000:]
        text = " ".join(bare.stderr.split())  # rich wraps long lines
        assert "checked before any training started" in text and "Traceback" not in text
        node_line = next(line for line in text.split("- node")[1:] if "missing" in line)
        assert f"{HEAD_IP}, {SECOND_IP}" in node_line or f"{SECOND_IP}, {HEAD_IP}" in node_line
        assert str(bare_bin / "python") in node_line
        missing = node_line.split("missing ", 1)[1].split(";")[0]
        for name in ("torch", "deepspeed", "typer", "numpy"):
            assert name in missing
        assert "ray" not in missing.split(", ") and "pydantic" not in missing.split(", ")
        assert "docker build --target gpu" in text and "cluster.runtime_env.py_executable" in text
        listed = json.loads(mla("jobs", "list", "--json", *auth).stdout)
        assert len(listed) == 1 and listed[0]["id"].endswith(
            "-preflight"
        )  # the training job never went in
        assert not (storage / "bare").exists()

        with socket.socket() as silent:  # accepts connections, never answers: an install that hangs
            silent.bind(("127.0.0.1", 0))
            silent.listen(16)
            index = f"http://127.0.0.1:{silent.getsockname()[1]}/simple"
            hang = mla(
                "submit",
                CONFIG,
                *auth,
                "--storage-path",
                str(storage),
                *sets(
                    f"cluster.runtime_env.pip=['--index-url {index}', 'mla-no-such-package']",
                    "cluster.runtime_env.setup_timeout_s=20",
                    "run.name=hang",
                ),
            )
        assert hang.returncode == 2, hang.stderr[-3000:]
        text = " ".join(hang.stderr.split())
        assert "the preflight check could not run on the cluster" in text and "FAILED" in text
        assert "runtime" in text.lower() and "timeout" in text.lower()

        fixed = ["cluster.runtime_env.py_executable=" + str(WORKING_PYTHON)]
        (tmp_path / "corpus.txt").write_text("only on the submitting machine\n" * 2000)
        local = mla(
            "submit",
            CONFIG,
            *auth,
            "--storage-path",
            str(storage),
            *sets(*fixed, "data.path=corpus.txt", "run.name=local"),
            cwd=tmp_path,
        )
        assert local.returncode == 2, local.stderr[-3000:]
        text = " ".join(local.stderr.split())
        assert "data.path 'corpus.txt' exists on this machine but not on nodes" in text
        assert "must be visible on the cluster" in text and "missing" not in text

        ok = mla(
            "submit",
            CONFIG,
            *auth,
            "--storage-path",
            str(storage),
            "--follow",
            *sets(*fixed, "train.steps=4", "run.name=venv"),
        )
        assert ok.returncode == 0, ok.stderr[-4000:]
        assert json.loads((storage / "venv" / "summary.json").read_text())["steps"] == 4
