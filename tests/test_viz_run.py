"""``mla viz run``: the PNGs exist, are not blank, and the plotted lines hold exactly the run's
records (read back from the matplotlib figure objects); resumes and layout changes are marked."""

from __future__ import annotations

import json

import numpy as np
import pytest

from orchestrator.viz_run import loss_figure, read_run, throughput_figure

LAYOUT_A = {"dp": 2, "tp": 1, "pp": 1, "zero_stage": 2}
LAYOUT_B = {"dp": 1, "tp": 1, "pp": 1, "zero_stage": 2}


@pytest.fixture
def run_dir(tmp_path):
    """A run folder as `mla train` writes it: 3 attempts, resumed at 20 and (on fewer workers) 40."""
    records = [{"step": 0, "val_loss": 5.5, "elapsed_s": 0.0}]
    for step in range(5, 61, 5):
        record = {
            "step": step,
            "loss": 5.0 - step / 20,
            "lr": 1e-3 * (1 - step / 100),
            "tokens_per_s": 4000.0 + step,
            "step_time_s": 0.2,
        }
        if step % 20 == 0:
            record["val_loss"] = 5.2 - step / 20
        records.append(record)
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    events = [
        {"event": "start", "layout": LAYOUT_A, "resumed_from_step": None},
        {"event": "start", "layout": LAYOUT_A, "resumed_from_step": 20},
        {"event": "start", "layout": LAYOUT_B, "resumed_from_step": 40},
    ]
    (tmp_path / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    (tmp_path / "job.json").write_text(
        json.dumps({"train": {"global_batch": 16}, "data": {"seq_len": 64}})
    )
    return tmp_path


def _lines(ax) -> dict:
    return {
        line.get_label(): (list(line.get_xdata()), list(line.get_ydata()))
        for line in ax.get_lines()
    }


def test_loss_plot_holds_the_records_against_step_and_tokens(run_dir):
    run = read_run(run_dir)
    by_step, by_tokens = loss_figure(run).axes
    lines = _lines(by_step)
    assert lines["train loss"] == (
        [s for s in range(5, 61, 5)],
        [5.0 - s / 20 for s in range(5, 61, 5)],
    )
    assert lines["val loss"] == ([0, 20, 40, 60], [5.5, 5.2 - 1, 5.2 - 2, 5.2 - 3])
    assert _lines(by_tokens)["val loss"][0] == [
        0,
        20 * 1024,
        40 * 1024,
        60 * 1024,
    ]  # 16 x 64 per step
    # one dashed line per resume, a dotted one at the layout change (2 workers -> 1 at step 40)
    assert [
        line.get_xdata()[0] for line in by_step.get_lines() if line.get_linestyle() == "--"
    ] == [20, 40]
    assert [line.get_xdata()[0] for line in by_step.get_lines() if line.get_linestyle() == ":"] == [
        40
    ]


def test_throughput_plot_holds_the_records(run_dir):
    tokens, step_time = throughput_figure(read_run(run_dir)).axes
    assert _lines(tokens)["tokens/s"][1] == [4000.0 + s for s in range(5, 61, 5)]
    assert _lines(step_time)["step time (s)"][1] == [0.2] * 12


def test_cli_writes_three_png_that_are_not_blank(run_dir, mla_cli):
    from matplotlib.image import imread

    got = mla_cli("viz", "run", str(run_dir))
    assert got.returncode == 0, got.stderr
    for name, width in (("loss", 1100), ("throughput", 1100), ("lr", 600)):
        pixels = imread(run_dir / "plots" / f"{name}.png")
        assert pixels.shape[:2] == (400, width)
        assert np.std(pixels[..., :3]) > 0.05  # lines and text, not an empty canvas


def test_a_folder_that_is_no_run_is_a_clear_error(tmp_path, mla_cli):
    got = mla_cli("viz", "run", str(tmp_path))
    assert got.returncode == 2 and "holds no metrics.jsonl and job.json" in " ".join(
        got.stderr.split()
    )
    assert "Traceback" not in got.stderr


def test_compare_plots_each_runs_val_loss_against_tokens(run_dir, tmp_path, mla_cli):
    from orchestrator.viz_run import compare_figure

    other = tmp_path / "other"
    other.mkdir()
    for name in ("metrics.jsonl", "events.jsonl"):
        (other / name).write_text((run_dir / name).read_text())
    (other / "job.json").write_text(
        json.dumps({"train": {"global_batch": 32}, "data": {"seq_len": 64}})
    )
    lines = _lines(compare_figure({"a": read_run(run_dir), "b": read_run(other)}).axes[0])
    assert lines["a"][0] == [0, 20 * 1024, 40 * 1024, 60 * 1024]
    assert lines["b"][0] == [
        0,
        20 * 2048,
        40 * 2048,
        60 * 2048,
    ]  # twice the batch: twice the tokens
    assert lines["a"][1] == lines["b"][1] == [5.5, 4.2, 3.2, 2.2]
    got = mla_cli("viz", "compare", str(run_dir), str(other), "-o", str(tmp_path / "c.png"))
    assert got.returncode == 0, got.stderr
    assert (tmp_path / "c.png").stat().st_size > 1000
