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


def test_every_command_module_follows_the_one_convention():
    """Each ``orchestrator/cli_<group>.py`` defines ``app``, is registered in COMMAND_MODULES,
    and prints through cli_common's consoles (no module builds a rich Console of its own)."""
    import ast
    import importlib
    from pathlib import Path

    import typer

    from orchestrator import cli

    folder = Path(cli.__file__).parent
    modules = sorted(p.stem.removeprefix("cli_") for p in folder.glob("cli_*.py"))
    assert sorted(cli.COMMAND_MODULES) == [m for m in modules if m != "common"]
    for group in cli.COMMAND_MODULES:
        assert isinstance(importlib.import_module(f"orchestrator.cli_{group}").app, typer.Typer)
    for path in folder.rglob("*.py"):
        if path.name == "cli_common.py":
            continue
        calls = [
            n
            for n in ast.walk(ast.parse(path.read_text()))
            if isinstance(n, ast.Call)
            and getattr(n.func, "id", getattr(n.func, "attr", "")) == "Console"
        ]
        assert not calls, f"{path} builds its own rich Console; print through cli_common"


def test_k8s_render_and_submit_share_one_option_list():
    from typer.main import get_command

    from orchestrator.cli import app

    k8s = get_command(app).commands["k8s"]
    render = {p.name for p in k8s.commands["render"].params} - {"output"}
    submit = {p.name for p in k8s.commands["submit"].params}
    assert len(render) == 15 and render <= submit


@pytest.mark.parametrize(
    "package, args, extra",
    [
        ("torch", ("generate", "runs/none", "--prompt", "a"), "train"),
        ("numpy", ("train", "configs/tiny.yaml"), "train"),
        ("kubernetes", ("k8s", "status", "mla-x"), "k8s"),
    ],
)
def test_a_missing_extra_names_the_extra_to_install(package, args, extra):
    """A plain ``pip install mla-train`` (no extras): commands that need torch or kubernetes say
    which extra to install, exit 2, no traceback (the package is hidden with sys.modules)."""
    code = (
        f"import sys; sys.modules[{package!r}] = None; sys.argv = ['mla', *{list(args)!r}]; "
        "from orchestrator.cli import main; main()"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2, result.stderr
    assert f"pip install 'mla-train[{extra}]'" in result.stderr
    assert "Traceback" not in result.stderr
