"""`mla tune`: search-space parsing, trial configs, outputs, and a real 6-trial ASHA sweep."""

from __future__ import annotations

import json

import pytest
import yaml

from orchestrator.contract.errors import ConfigError
from orchestrator.tune import parse_search, plot_sweep, trial_job, validate_space


def test_parse_search_parses_values_as_yaml():
    assert parse_search(["model.local_window=16,32", "train.lr=0.001,0.01"]) == {
        "model.local_window": [16, 32], "train.lr": [0.001, 0.01]}


@pytest.mark.parametrize("bad", ["model.local_window", "=1,2", "model.global_k="])
def test_parse_search_rejects_malformed_items(bad):
    with pytest.raises(ConfigError, match="expected KEY=V1,V2"):
        parse_search([bad])


def test_trial_job_applies_params_and_isolates_the_run_folder(tmp_path, tiny_job):
    base = tiny_job().model_dump(mode="json")
    job = trial_job(base, {"model.local_window": 16, "model.global_k": 4}, str(tmp_path), "trial_1")
    assert (job.model.local_window, job.model.global_k) == (16, 4)
    assert job.run_dir == tmp_path / "trial_1"


def test_space_values_are_validated_before_any_trial(tiny_job):
    job = tiny_job()
    with pytest.raises(ConfigError, match="model.local_window"):
        validate_space(job, {"model.local_window": [16, -1]})
    with pytest.raises(ConfigError, match="unknown key 'top_k'"):
        validate_space(job, {"model.top_k": [4]})


def test_plot_is_written_for_two_searched_fields(tmp_path):
    rows = [{"a": a, "b": b, "best_val_loss": a / b} for a in (1, 2) for b in (3, 4)]
    plot_sweep(rows, ["a", "b"], "val_loss", tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_six_trial_asha_sweep_writes_table_best_config_and_plot_and_best_config_trains(tmp_path, mla_cli):
    sets = ["data.seq_len=64", "train.micro_batch=8", "train.global_batch=16", "train.warmup_steps=5",
            "train.log_every=10", "train.eval_every=5", "train.eval_batches=1", "checkpoint.every=40",
            "cluster.num_workers=1", f"run.dir={tmp_path}", "run.name=sweep"]
    args = ["tune", "configs/tiny.yaml", "--search", "model.local_window=8,16,32",
            "--search", "model.global_k=2,8", "--scheduler", "asha", "--max-steps", "40"]
    result = mla_cli(*args, sets=sets, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    sweep = tmp_path / "sweep-sweep"
    trials = json.loads((sweep / "trials.json").read_text())["trials"]
    assert len(trials) == 6 and all(t["best_val_loss"] is not None for t in trials)
    assert any(t["stopped_early"] for t in trials)  # ASHA cut at least one trial short
    assert "best: model.local_window=" in result.stderr  # the summary reached the user
    assert (sweep / "val_loss.png").stat().st_size > 1000
    best = yaml.safe_load((sweep / "best.yaml").read_text())
    winner = min(trials, key=lambda t: t["best_val_loss"])
    assert best["model"]["local_window"] == winner["model.local_window"]
    assert best["model"]["global_k"] == winner["model.global_k"]

    resumed = mla_cli(*args, "--resume", sets=sets)
    assert resumed.returncode == 0, resumed.stderr[-4000:]  # Tune restored the finished sweep
    assert json.loads((sweep / "trials.json").read_text())["trials"] == trials

    train = mla_cli("train", str(sweep / "best.yaml"))
    assert train.returncode == 0, train.stderr[-4000:]
    summary = json.loads((tmp_path / "sweep-best" / "summary.json").read_text())
    assert summary["steps"] == 40
