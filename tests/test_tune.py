"""`mla tune`: search-space parsing, trial configs, outputs, and a real 6-trial ASHA sweep."""

from __future__ import annotations

import json

import pytest
import yaml

from orchestrator.contract.errors import ConfigError
from orchestrator.tune import parse_search, plot_sweep, trial_job, validate_space


def test_parse_search_parses_values_as_yaml():
    assert parse_search(["model.local_window=16,32", "train.lr=0.001,0.01"]) == {
        "model.local_window": [16, 32],
        "train.lr": [0.001, 0.01],
    }


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
def test_six_trial_asha_sweep_writes_table_best_config_and_plot_and_best_config_trains(
    tmp_path, mla_cli
):
    sets = [
        "data.seq_len=64",
        "train.micro_batch=8",
        "train.global_batch=16",
        "train.warmup_steps=5",
        "train.log_every=10",
        "train.eval_every=5",
        "train.eval_batches=1",
        "checkpoint.every=40",
        "cluster.num_workers=1",
        f"run.dir={tmp_path}",
        "run.name=sweep",
    ]
    args = [
        "tune",
        "configs/tiny.yaml",
        "--search",
        "model.local_window=8,16,32",
        "--search",
        "model.global_k=2,8",
        "--scheduler",
        "asha",
        "--max-steps",
        "40",
    ]
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


class _Result:
    """What Tune's ``Result`` offers ``_row``: the config, the reported metrics, the error."""

    def __init__(self, config: dict, records: list[dict], error=None):
        import pandas as pd

        self.config, self.metrics_dataframe, self.error = config, pd.DataFrame(records), error


def test_best_excludes_the_untrained_step0_evaluation_and_diverged_trials_are_never_best():
    from orchestrator.tune import _row, pick_best

    space = {"train.lr": [1e-3, 1e6]}
    diverged = _row(
        _Result(
            {"train.lr": 1e6},
            [{"step": 0, "val_loss": 5.2348}, {"step": 10, "loss": 5.545, "diverged": True}],
        ),
        space,
        40,
        "val_loss",
    )
    nan = _row(
        _Result(
            {"train.lr": 10.0},
            [{"step": 0, "val_loss": 5.2348}, {"step": 10, "val_loss": float("nan")}],
        ),
        space,
        40,
        "val_loss",
    )
    good = _row(
        _Result(
            {"train.lr": 1e-3}, [{"step": 0, "val_loss": 5.2348}, {"step": 10, "val_loss": 5.4}]
        ),
        space,
        40,
        "val_loss",
    )
    assert (
        diverged["diverged"]
        and diverged["best_val_loss"] is None
        and "diverged" in diverged["error"]
    )
    assert nan["best_val_loss"] is None  # the NaN evaluation is not "best 5.2348"
    assert (
        good["best_val_loss"] == 5.4
    )  # worse than the untrained 5.2348, but the only trained value
    assert pick_best([diverged, nan, good], space, "val_loss") is good
    assert pick_best([diverged, nan], space, "val_loss") is None


def test_ties_are_broken_numerically_not_by_string_order():
    from orchestrator.tune import pick_best

    space = {"model.local_window": [9, 10]}
    rows = [
        {"model.local_window": 10, "best_val_loss": 2.0},
        {"model.local_window": 9, "best_val_loss": 2.0},
    ]
    assert pick_best(rows, space, "val_loss")["model.local_window"] == 9  # "10" < "9" as strings


def test_a_search_list_mixing_number_spellings_is_numeric_and_plots(tmp_path):
    space = parse_search(["train.lr=0.001,3e-3,1e-2"])
    assert space == {"train.lr": [0.001, 0.003, 0.01]}  # YAML 1.1 reads 3e-3 as a string
    rows = [{"train.lr": lr, "best_val_loss": 1.0 + lr} for lr in space["train.lr"]]
    plot_sweep(rows, ["train.lr"], "val_loss", tmp_path / "p.png")
    assert (tmp_path / "p.png").is_file()


def test_samples_below_one_is_refused_before_anything_starts(tiny_job):
    from orchestrator.tune import run_sweep

    job = tiny_job()
    with pytest.raises(ConfigError, match="--samples 0"):
        run_sweep(job, {"model.global_k": [2]}, samples=0)


def test_unknown_metric_exits_2_naming_the_metrics_before_ray_or_a_sweep_folder(tmp_path, mla_cli):
    res = mla_cli(
        "tune",
        "configs/tiny.yaml",
        "--search",
        "model.global_k=2,4",
        "--metric",
        "bogus",
        sets=[f"run.dir={tmp_path}"],
        timeout=120,
    )
    assert res.returncode == 2, res.stderr
    assert "--metric 'bogus'" in res.stderr and "val_loss, loss" in res.stderr
    assert "Traceback" not in res.stderr and list(tmp_path.iterdir()) == []
