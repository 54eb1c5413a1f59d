"""The `mla` command line: usage mistakes get click's one-line usage error (exit 2), user errors
get `error: ...` (exit 2), never a traceback; the CLI starts without importing torch or Ray."""

import subprocess
import sys

import pytest


@pytest.mark.parametrize(
    "args, message",
    [
        (("trian", "configs/tiny.yaml"), "No such command 'trian'"),
        (("train",), "Missing argument"),
        (("train", "configs/tiny.yaml", "--bogus"), "No such option: --bogus"),
        (
            ("plan", "--model", "7b", "--gpus", "abc", "--gpu", "h100", "--global-batch", "64"),
            "Invalid value for '--gpus'",
        ),
    ],
)
def test_usage_mistakes_exit_2_with_one_message_and_no_traceback(mla_cli, args, message):
    result = mla_cli(*args, timeout=120)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr


def test_no_arguments_prints_help_and_succeeds(mla_cli):
    result = mla_cli(timeout=120)
    assert result.returncode == 0 and "train" in result.stdout + result.stderr


def test_model_validator_errors_read_as_one_sentence(mla_cli):
    result = mla_cli("train", "configs/tiny.yaml", sets=["train.global_batch=30"], timeout=120)
    assert result.returncode == 2
    assert "- train.global_batch(30) is not a multiple of train.micro_batch(8)" in result.stderr
    assert "Value error" not in result.stderr and "'model':" not in result.stderr


def test_cli_imports_neither_torch_nor_ray():
    code = "import sys, orchestrator.cli; print('torch' in sys.modules, 'ray' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
    ).stdout
    assert out.split() == ["False", "False"]
