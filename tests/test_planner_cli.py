"""``mla plan`` command line: JSON document, estimate mode and user errors."""

import json

import typer
from typer.testing import CliRunner

from orchestrator.cli_plan import plan
from orchestrator.contract.errors import PlanError

# The command alone (orchestrator/cli.py registers the same function as ``mla plan``).
app = typer.Typer()
app.command("plan")(plan)
app.command("noop")(lambda: None)
runner = CliRunner()


def test_plan_json_document():
    res = runner.invoke(
        app,
        [
            "plan",
            "--model",
            "tiny",
            "--gpus",
            "4",
            "--gpu",
            "cpu",
            "--global-batch",
            "32",
            "--json",
            "--top",
            "3",
        ],
    )
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert (
        doc["best"]["layout"]["dp"] * doc["best"]["layout"]["tp"] * doc["best"]["layout"]["pp"] == 4
    )
    assert len(doc["candidates"]) == 3


def test_estimate_mode_with_every_field_pinned():
    res = runner.invoke(
        app,
        [
            "plan",
            "--params",
            "7B",
            "--gpu",
            "a100-40gb",
            "--global-batch",
            "8",
            "--dp",
            "1",
            "--tp",
            "1",
            "--pp",
            "1",
            "--zero",
            "0",
            "--micro-batch",
            "1",
            "--recompute",
            "none",
            "--no-sequence-parallel",
            "--virtual-stages",
            "1",
            "--estimate",
            "--json",
        ],
    )
    assert res.exit_code == 0, res.output
    est = json.loads(res.stdout)["estimate"]
    assert est["estimate"]["fits"] is False and "> 40 GiB" in est["reason"]


def test_explicit_dims_table():
    res = runner.invoke(
        app,
        [
            "plan",
            "--layers",
            "4",
            "--hidden",
            "256",
            "--heads",
            "4",
            "--vocab",
            "1000",
            "--seq-len",
            "128",
            "--gpus",
            "2",
            "--gpu",
            "cpu",
            "--global-batch",
            "8",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "best" in res.stdout and "tokens/s" in res.stdout


def test_estimate_without_all_pins_is_an_error():
    res = runner.invoke(app, ["plan", "--model", "tiny", "--gpus", "2", "--estimate"])
    assert isinstance(res.exception, PlanError) and "missing" in str(res.exception)


def test_zero_stages_option_restricts_the_plan():
    res = runner.invoke(
        app,
        [
            "plan",
            "--model",
            "tiny",
            "--gpus",
            "4",
            "--gpu",
            "cpu",
            "--global-batch",
            "32",
            "--zero-stages",
            "0,1",
            "--json",
        ],
    )
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["request"]["allowed_zero_stages"] == [0, 1]
    assert {c["layout"]["zero_stage"] for c in doc["candidates"]} <= {0, 1}
