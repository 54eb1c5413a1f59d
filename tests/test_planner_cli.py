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
    # The document is printed, then the PlanError (exit 2 from `mla`): the layout does not fit.
    assert isinstance(res.exception, PlanError) and "does not fit" in str(res.exception)
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


def _plan_json(*args: str) -> dict:
    res = runner.invoke(app, ["plan", *args, "--gpus", "8", "--json", "--top", "1"])
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


def test_attention_flags_override_a_preset_a_count_and_a_config():
    # request.model is describe_model's line, ending in "dense" or "mla(w=..., k=...)".
    assert _plan_json("--model", "7b")["request"]["model"].endswith("mla(w=1024, k=256)")
    dense = _plan_json("--model", "7b", "--attention", "dense")
    assert dense["request"]["model"].endswith(" dense")
    mla = _plan_json("--params", "7B", "--window", "64", "--top-k", "8")
    assert mla["request"]["model"].endswith("mla(w=64, k=8)")
    cfg = _plan_json("--config", "configs/tiny.yaml", "--attention", "dense")
    assert cfg["request"]["model"].endswith(" dense")


def test_shape_flags_with_a_named_model_are_refused_naming_both():
    for source in (["--model", "7b"], ["--config", "configs/tiny.yaml"]):
        res = runner.invoke(app, ["plan", *source, "--heads", "7", "--gpus", "8"])
        assert isinstance(res.exception, PlanError)
        assert "--heads" in str(res.exception) and source[0] in str(res.exception)


def test_window_longer_than_the_sequence_and_window_with_dense_are_refused():
    res = runner.invoke(app, ["plan", "--model", "7b", "--window", "100000", "--gpus", "8"])
    assert isinstance(res.exception, PlanError) and "at most 4096" in str(res.exception)
    res = runner.invoke(
        app, ["plan", "--params", "7B", "--window", "64", "--attention", "dense", "--gpus", "8"]
    )
    assert isinstance(res.exception, PlanError) and "--attention mla" in str(res.exception)


def _plan_error(*args: str) -> str:
    res = runner.invoke(app, ["plan", *args])
    assert isinstance(res.exception, PlanError), res.output
    return str(res.exception)


def test_cluster_and_zero_flags_are_refused_naming_the_flag_and_the_fix():
    assert "give --gpus 6 or 9" in _plan_error(
        "--model", "7b", "--gpus", "8", "--gpus-per-node", "3"
    )
    assert "--zero-stages '5'" in _plan_error("--model", "7b", "--gpus", "8", "--zero-stages", "5")
    message = _plan_error("--model", "7b", "--gpus", "8", "--zero", "3", "--zero-stages", "0,1")
    assert "--zero 3 is not among --zero-stages 0,1" in message
    assert "fix: pin --dp/--tp/--pp to divisors of 8" in _plan_error(
        "--model", "7b", "--gpus", "8", "--tp", "3"
    )


def test_small_models_are_counted_in_k_and_m_not_zero_b():
    from mla.config import PRESETS
    from orchestrator.planner.shapes import describe_model

    assert describe_model(PRESETS["tiny"]).startswith("838.8k params")
    assert describe_model(PRESETS["7b"]).startswith("6.6B params")


def test_estimate_of_a_layout_that_does_not_fit_prints_it_and_exits_2(mla_cli):
    pins = ["--dp", "2", "--tp", "1", "--pp", "1", "--zero", "0", "--micro-batch", "1"]
    pins += ["--recompute", "none", "--no-sequence-parallel", "--virtual-stages", "1"]
    res = mla_cli("plan", "--model", "70b", "--gpus", "2", *pins, "--estimate", "--json")
    assert res.returncode == 2 and "the pinned layout does not fit: total" in res.stderr
    assert json.loads(res.stdout)["estimate"] is not None and "Traceback" not in res.stderr


def test_fewer_gpus_than_one_node_says_so_on_stderr(mla_cli):
    res = mla_cli("plan", "--model", "7b", "--gpus", "7", "--gpus-per-node", "8", "--json")
    assert res.returncode == 0, res.stderr
    assert "--gpus 7 uses 7 of one 8-GPU node" in res.stderr
    assert json.loads(res.stdout)["request"]["gpus_per_node"] == 7
