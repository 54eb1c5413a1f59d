"""Malformed inputs a new user may try: each gives one message and exit 2, no traceback, and
writes nothing half-done (the inputs found failing while trying 70 of them, issue 13)."""

from __future__ import annotations

import subprocess
import sys

import pytest

MLA = [sys.executable, "-m", "orchestrator.cli"]


@pytest.mark.parametrize(
    "args, words",
    [
        (["train", "configs"], "is a folder"),
        (
            ["train", "configs/tiny.yaml", "--set", "run.dir=/proc/mla"],
            "run.dir: cannot create or write the run folder",
        ),
        (
            ["plan", "--model", "7b", "--gpus", "8", "--attention", "foo"],
            "--attention 'foo' must be dense or mla",
        ),
        (
            ["k8s", "render", "configs/tiny.yaml", "-o", "/nonexistent/dir/x.yaml"],
            "--output '/nonexistent/dir/x.yaml'",
        ),
        (
            ["k8s", "render", "configs/tiny.yaml", "--image", "a b"],
            "--image: 'a b' is not a container image",
        ),
        (["k8s", "render", "configs/tiny.yaml", "--namespace", "Team_A"], "--namespace: 'Team_A'"),
        (
            ["generate", "configs/tiny.yaml", "--prompt", "x"],
            "configs/tiny.yaml is a file, not a checkpoint; pass the run folder",
        ),
        (
            ["k8s", "status", "demo", "--kubeconfig", "/nonexistent/kubeconfig"],
            "--kubeconfig /nonexistent/kubeconfig does not exist",
        ),
        (
            ["bench", "decode", "--batches", "0"],
            "--batches='0' must list positive integers, e.g. 1,8",
        ),
    ],
)
def test_malformed_input_is_one_message_and_exit_2(args, words):
    out = subprocess.run([*MLA, *args], capture_output=True, text=True, timeout=180)
    assert out.returncode == 2, out.stderr[-2000:]
    assert words in " ".join(out.stderr.split()) and "Traceback" not in out.stderr
