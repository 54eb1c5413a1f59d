"""The early-exit stage of `mla compress` (in process, no ONNX): its report is consistent with
what the routing computes, the calibrated threshold meets the tolerance, the saved exits reload
with the same routing, threshold 1.0 in the saved file reproduces the full model's generation
through `mla generate`, `mla eval` reports loss with and without exits, and bad --early-exit
values are refused before any work."""

import copy
import json
import sys

import numpy as np
import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

from mla.compress.early_exit import ExitStats, early_exit_forward
from mla.generate import generate
from mla.pretrained import load_pretrained, save_pretrained
from mla.sampling import SamplingConfig
from orchestrator.cli import app
from orchestrator.contract.errors import ConfigError
from tests.compress_fixture import corpus_windows, train_tiny
from workers.compress import Stages
from workers.compress_exit import (
    EXIT_FILE,
    ExitStage,
    load_exit_config,
    parse_exits,
    routed_eval,
    save_exit_config,
)
from workers.evaluation import EvalData, evaluate

EXITS = (1, 2)


@pytest.fixture(scope="module")
def val():
    _, v = corpus_windows(64)
    x, y = v.windows(np.arange(16))
    return EvalData(x, y, "16 validation windows of 64 tokens")


@pytest.fixture(scope="module")
def staged(tmp_path_factory, val):
    """A 3-layer teacher, a copy whose exits are trained 15 steps, calibrated and saved."""
    torch.set_num_threads(1)
    teacher = train_tiny(steps=80, n_layers=3, attention="dense")
    student = copy.deepcopy(teacher)
    train, _ = corpus_windows(64)
    batches = (
        tuple(torch.from_numpy(a) for a in train.windows(np.arange(i * 4, i * 4 + 4)))
        for i in range(10_000)
    )
    stage = ExitStage(EXITS, 15, 3e-3, 0.05, None)
    stages = Stages(Console(stderr=True, quiet=True))
    loss_of = lambda m: evaluate(m, val)["loss"]  # noqa: E731
    stage.train(student, teacher, batches, loss_of, stages)
    folder = save_pretrained(student, tmp_path_factory.mktemp("exit") / "pruned")
    row = stage.finish(student, val, loss_of(teacher), folder, stages)
    return student, folder, row


def test_the_report_is_what_the_routing_computes(staged, val):
    student, _, row = staged
    assert row["exits"] == list(EXITS) and row["exit_steps"] == 15
    assert row["threshold"] < 1.0 and row["compute_saved"] > 0  # the exits are used
    fractions = row["exit_fractions"]
    assert list(fractions) == ["1", "2", "3"]
    assert sum(fractions.values()) == pytest.approx(1.0)
    assert row["mean_layers"] == pytest.approx(sum(int(k) * v for k, v in fractions.items()))
    layers = []
    with torch.no_grad():
        for i in range(0, len(val.inputs), 8):
            x = torch.from_numpy(val.inputs[i : i + 8])
            layers.append(early_exit_forward(student, x, list(EXITS), row["threshold"])[1].layers)
    stats = ExitStats(torch.cat([t.flatten() for t in layers]), 3, EXITS)
    assert row["compute_saved"] == stats.compute_saved
    assert row["compute_saved"] == pytest.approx(1 - row["mean_layers"] / 3)
    d = row["decode_batch1"]
    assert (
        d["tokens_per_s_full"] > 0
        and d["tokens_per_s_exit"] > 0
        and d["tokens_per_s_threshold_1"] > 0
    )
    assert d["speedup"] == pytest.approx(d["tokens_per_s_exit"] / d["tokens_per_s_full"])
    assert sum(d["exit_fractions"].values()) == pytest.approx(1.0)


def test_the_threshold_meets_the_tolerance_on_the_calibration_windows(staged, val):
    _, _, row = staged
    assert row["tolerance"] == 0.05 and row["tolerance_source"] == "--exit-tolerance"
    assert row["loss_increase"] <= row["tolerance"]
    chosen = next(r for r in row["calibration"] if r["threshold"] == row["threshold"])
    assert chosen["loss_increase"] <= row["tolerance"]
    assert chosen["val_loss"] == pytest.approx(row["val_loss_with_exits"], rel=1e-6)
    # no lower grid threshold was within tolerance
    assert all(
        r["loss_increase"] > row["tolerance"]
        for r in row["calibration"]
        if r["threshold"] < row["threshold"]
    )


def test_the_saved_exits_reload_with_the_reported_routing(staged, val):
    _, folder, row = staged
    config = load_exit_config(folder, 3)
    assert config["exits"] == list(EXITS) and config["threshold"] == row["threshold"]
    again = routed_eval(load_pretrained(folder), val, config["exits"], config["threshold"])
    assert again["exit_fractions"] == row["exit_fractions"]
    assert again["val_loss"] == pytest.approx(row["val_loss_with_exits"], rel=1e-9)


def _cli(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result


def test_mla_eval_reports_loss_with_and_without_exits(staged, val):
    _, folder, row = staged
    res = _cli("eval", folder, "--max-windows", "16", "--seq-len", "64", "--json")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout[res.stdout.index("{") :])
    e = doc["early_exit"]
    assert e["exits"] == list(EXITS) and e["threshold"] == row["threshold"]
    assert e["val_loss_full"] == pytest.approx(doc["loss"], rel=1e-9)
    assert sum(e["exit_fractions"].values()) == pytest.approx(1.0)
    off = _cli(
        "eval", folder, "--max-windows", "16", "--seq-len", "64", "--json", "--no-early-exit"
    )
    assert "early_exit" not in json.loads(off.stdout[off.stdout.index("{") :])


def test_threshold_one_in_the_saved_file_reproduces_full_generation(staged, tmp_path):
    student, folder, _ = staged
    one = save_pretrained(student, tmp_path / "one")
    save_exit_config(one, list(EXITS), 1.0, 3, 0.0)
    prompts = ["def main():\n    ", "import os\nimport "]
    args = ["generate", one, "--temperature", "0", "--max-new-tokens", "20", "--json"]
    res = _cli(*args, *(a for p in prompts for a in ("--prompt", p)))
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout[res.stdout.index("[") :])
    want = generate(
        load_pretrained(one), [list(p.encode()) for p in prompts], 20, SamplingConfig(0.0)
    )
    assert [list(r["completion"].encode()) for r in rows] == want
    assert [r["early_exit"]["mean_layers"] for r in rows] == [3.0, 3.0]
    # the calibrated file exits earlier on the same prompts (or at least never uses more layers)
    cal = _cli("generate", folder, "--temperature", "0", "--max-new-tokens", "20", "--json",
               "--prompt", prompts[0])  # fmt: skip
    assert json.loads(cal.stdout[cal.stdout.index("[") :])[0]["early_exit"]["mean_layers"] <= 3


def test_early_exit_without_the_file_is_refused(tmp_path):
    plain = save_pretrained(train_tiny(steps=0, n_layers=3), tmp_path / "plain")
    res = _cli("generate", plain, "--prompt", "x", "--early-exit")
    assert isinstance(res.exception, ConfigError) and EXIT_FILE in str(res.exception)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("1,x", "--early-exit='1,x' must be comma-separated layer numbers"),
        ("1.5", "must be comma-separated layer numbers"),
        ("0", "--early-exit=0: exits=[0] must be strictly increasing layers in [1, 2]"),
        ("3", "an exit after the last is the full model"),
        ("1,1", "--early-exit=1,1: exits=[1, 1] must be strictly increasing"),
        ("2,1", "strictly increasing"),
    ],
)
def test_bad_early_exit_values_are_refused_before_any_work(tmp_path, value, message):
    teacher = save_pretrained(train_tiny(steps=0, n_layers=3), tmp_path / "teacher")
    out = tmp_path / "out"
    res = _cli("compress", teacher, "--target-mb", "1", "--early-exit", value, "--out", out)
    assert isinstance(res.exception, ConfigError), res.output
    assert res.exception.exit_code == 2 and message in str(res.exception)
    assert "e.g. --early-exit" in str(res.exception)
    assert not out.exists()


def test_exit_options_are_checked_up_front():
    assert parse_exits("2, 3") == (2, 3)
    from workers.compress import CompressSettings, check_settings

    with pytest.raises(ConfigError, match="--exit-steps=-1 must be >= 0"):
        check_settings(CompressSettings(target_mb=1.0, early_exit=(1,), exit_steps=-1))
    with pytest.raises(ConfigError, match="--exit-tolerance=-0.1 must be >= 0"):
        check_settings(CompressSettings(target_mb=1.0, early_exit=(1,), exit_tolerance=-0.1))
    with pytest.raises(ConfigError, match="--exit-tolerance needs --early-exit"):
        check_settings(CompressSettings(target_mb=1.0, exit_tolerance=0.1))


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
