"""`mla compress` and `mla eval --onnx` end to end on a trained tiny model: the deployed file
meets the size budget and reloads with the reported loss; bad targets are refused before any
work; an unreachable budget exits 2 with what it achieved."""

import json
import os
import subprocess
import sys

import pytest
import torch

from mla.pretrained import load_pretrained, save_pretrained
from tests.compress_fixture import train_tiny

# ONNX export and ONNX Runtime sessions take minutes on a loaded 2-core machine.
pytestmark = pytest.mark.slow

pytest.importorskip("onnxruntime")

MLA = [sys.executable, "-m", "orchestrator.cli"]
FAST = ("--steps", "20", "--val-windows", "16", "--candidates", "1")


def mla(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [*MLA, *map(str, args)], capture_output=True, text=True, timeout=600, env=env
    )
    result.stderr = " ".join(result.stderr.split())
    return result


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    torch.set_num_threads(1)
    model = train_tiny(steps=150, attention="dense", d_model=64, ffn_hidden=128)
    return save_pretrained(model, tmp_path_factory.mktemp("compress") / "teacher")


@pytest.fixture(scope="module")
def compressed(teacher):
    out = teacher.parent / "out"
    result = mla("compress", teacher, "--target-mb", "0.26", "--out", out, *FAST, "--json")
    return result, out


def test_compress_meets_the_budget_on_the_deployed_file(compressed):
    result, out = compressed
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)
    deployed = report["deployed"]
    size = (out / "model.int8.onnx").stat().st_size
    assert size <= 0.26e6 and abs(deployed["size_mb"] - size / 1e6) < 1e-9
    assert deployed["groups_keep"] * deployed["ffn_keep"] < 2 * 128  # it pruned
    assert report["met"] == {"size": True, "loss": None}
    assert json.loads((out / "compress_report.json").read_text()) == report
    assert "mla compress" in result.stderr and "model.int8.onnx" in result.stderr


def test_compressed_artefacts_reload_and_give_the_reported_loss(compressed):
    result, out = compressed
    report = json.loads(result.stdout)
    ev = mla("eval", out, "--onnx", "--max-windows", "16", "--json")
    assert ev.returncode == 0, ev.stderr
    assert json.loads(ev.stdout)["loss"] == pytest.approx(report["deployed"]["val_loss"], abs=1e-6)
    pruned = load_pretrained(out / "pruned")
    assert pruned.cfg.ffn_hidden == report["deployed"]["ffn_keep"]
    torch_ev = mla("eval", out / "pruned", "--max-windows", "16", "--seq-len", "64", "--json")
    assert json.loads(torch_ev.stdout)["loss"] == pytest.approx(
        report["deployed"]["torch_val_loss"], abs=1e-5
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--target-mb", "0"), "--target-mb=0 must be a positive size in MB"),
        (("--target-mb", "0.01"), "below what this model takes with every prunable unit removed"),
        (
            ("--target-mb", "1", "--max-loss-increase", "-1"),
            "--max-loss-increase=-1 must be >= 0",
        ),
        (
            ("--target-mb", "1", "--precision", "int4"),
            "--precision='int4' must be 'int8' or 'fp32'",
        ),
    ],
)
def test_bad_targets_are_refused_before_any_work(teacher, tmp_path, args, message):
    result = mla("compress", teacher, *args, "--out", tmp_path / "out")
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_unreachable_budget_exits_2_with_what_it_achieved(teacher, tmp_path):
    out = tmp_path / "out"
    result = mla("compress", teacher, "--target-mb", "0.2", "--out", out, *FAST)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "budget not met: no pruning shape fits --target-mb 0.2" in result.stderr
    report = json.loads((out / "compress_report.json").read_text())
    assert report["met"]["size"] is False and "teacher_onnx_int8" in report
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary left


def test_onnx_generate_and_eval_length_check(compressed):
    _, out = compressed
    gen = mla("generate", out, "--onnx", "--prompt", "def ", "--max-new-tokens", "5", "--json")
    assert gen.returncode == 0, gen.stderr
    assert json.loads(gen.stdout)[0]["new_tokens"] == 5
    bad = mla("eval", out, "--onnx", "--seq-len", "32")
    assert bad.returncode == 2
    assert "takes windows of exactly 64 tokens" in bad.stderr
