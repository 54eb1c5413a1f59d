"""`mla compress` and `mla eval --onnx` end to end on a trained tiny model: the deployed file
meets the size (with QAT) or latency budget; every artefact reloads and gives the outputs
recorded before it was written; bad targets are refused before any work; an unreachable budget
exits 2 with what it achieved."""

import json
import os
import subprocess
import sys

import pytest
import torch

from mla.compress.onnx_export import OnnxLM
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
    result = mla(
        "compress",
        teacher,
        "--target-mb",
        "0.26",
        "--out",
        out,
        *FAST,
        "--qat-steps",
        "5",
        "--early-exit",
        "1",
        "--exit-steps",
        "5",
        "--json",
    )
    return result, out


@pytest.fixture(scope="module")
def latency_fp32(teacher):
    """A latency budget any shape meets: the least aggressive shape (no pruning) is chosen."""
    out = teacher.parent / "out-latency"
    args = ("--target-latency-ms", "10000", "--batch", "2", "--precision", "fp32")
    result = mla("compress", teacher, *args, "--out", out, *FAST, "--json")
    return result, out


def test_compress_meets_the_budget_on_the_deployed_file(compressed):
    result, out = compressed
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)
    deployed = report["deployed"]
    size = (out / "model.int8.onnx").stat().st_size
    assert size <= 0.26e6 and abs(deployed["size_mb"] - size / 1e6) < 1e-9
    assert deployed["groups_keep"] * deployed["ffn_keep"] < 2 * 128  # it pruned
    assert report["met"] == {"size": True, "latency": None, "loss": None}
    assert report["qat"]["steps"] == 5 and "QAT" in result.stderr
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
    # the saved exits (pruned/early_exit.json) route the same windows as the report says
    routed, e = json.loads(torch_ev.stdout)["early_exit"], report["early_exit"]
    assert routed["threshold"] == e["threshold"] and routed["exits"] == e["exits"] == [1]
    assert routed["exit_fractions"] == e["exit_fractions"]
    assert routed["val_loss"] == pytest.approx(e["val_loss_with_exits"], abs=1e-6)


def test_latency_target_picks_the_least_aggressive_shape_that_meets_it(latency_fp32):
    result, out = latency_fp32
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)
    d = report["deployed"]
    assert (d["ffn_keep"], d["groups_keep"]) == (128, 2)  # unpruned: it already meets 10 s
    probed = report["candidates_latency_probed"]
    assert probed[0]["params"] < d["params"]  # the smallest shape was timed first
    assert all(c["probe_latency_ms"] > 0 for c in probed)
    assert 0 < report["empty_model_latency_ms"] < d["latency_ms"]["2"] <= 10000
    assert report["met"] == {"size": None, "latency": True, "loss": None}
    assert (out / "model.onnx").is_file() and not (out / "model.int8.onnx").exists()


@pytest.mark.parametrize("which", ["compressed", "latency_fp32"])
def test_every_artefact_reloads_and_gives_the_recorded_outputs(which, request):
    result, out = request.getfixturevalue(which)
    report = json.loads(result.stdout)
    assert json.loads((out / "compress_report.json").read_text()) == report
    ref = report["reference"]
    tokens = torch.tensor([ref["tokens"]])
    torch.set_num_threads(1)
    pruned = load_pretrained(out / "pruned")
    with torch.no_grad():
        got = pruned(tokens)[0, -1]
    assert torch.equal(got, torch.tensor(ref["torch_logits_last"], dtype=torch.float32))
    onnx = OnnxLM(out / report["deployed"]["file"])
    assert onnx.cfg == pruned.cfg
    want = torch.tensor(ref["onnx_logits_last"], dtype=torch.float32)
    assert torch.equal(torch.from_numpy(onnx(tokens.numpy())[0, -1]), want)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["compress_report.json", "pruned", report["deployed"]["file"]]
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
        (("--target-latency-ms", "0"), "--target-latency-ms=0 must be a positive time in ms"),
        (("--target-latency-ms", "-3"), "--target-latency-ms=-3 must be a positive time in ms"),
        (
            ("--target-latency-ms", "0.0001"),
            "--target-latency-ms=0.0001 is below what an empty model takes on this machine",
        ),
        (("--target-mb", "1", "--groups-keep", "0"), "pruning every head leaves no attention"),
        (("--target-mb", "1", "--ffn-keep", "0"), "pruning every MLP neuron leaves no MLP"),
        (("--hidden-keep", "0"), "--hidden-keep=0 must be in [1, d_model=64]"),
        (("--layers-keep", "3"), "--layers-keep=3 must be in [1, n_layers=2]"),
        (
            ("--target-mb", "1", "--qat-steps", "5", "--precision", "fp32"),
            "--qat-steps=5 simulates INT8",
        ),
        ((), "nothing to fit: give --target-mb MB, --target-latency-ms MS"),
    ],
)
def test_bad_targets_are_refused_before_any_work(teacher, tmp_path, args, message):
    result = mla("compress", teacher, *args, "--out", tmp_path / "out")
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_unreachable_budget_exits_2_with_what_it_achieved(teacher, tmp_path):
    out = tmp_path / "out"
    result = mla("compress", teacher, "--target-mb", "0.05", "--out", out, *FAST)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "budget not met: no pruning shape fits --target-mb 0.05" in result.stderr
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


def test_tight_latency_target_prunes_to_the_least_aggressive_shape_that_meets_it(tmp_path):
    """An MLP-heavy model (MLP width 2048, one head group: the shapes differ in MLP width only)
    and a target between the unpruned and the most pruned shape's measured latency."""
    import math

    from mla.compress.importance import measure_importance
    from mla.compress.prune import apply_pruning, plan_pruning
    from tests.compress_fixture import val_batch
    from workers.compress_latency import shape_latency_ms

    torch.set_num_threads(1)
    model = train_tiny(
        steps=20, attention="dense", d_model=64, n_heads=2, n_kv_heads=1, ffn_hidden=2048
    )
    src = save_pretrained(model, tmp_path / "teacher")
    x, _ = val_batch(2)
    small = apply_pruning(model, plan_pruning(measure_importance(model, [x]), model.cfg, 512, 1))
    full_ms = shape_latency_ms(model, 64, 8, "int8", 1, tmp_path)
    small_ms = shape_latency_ms(small, 64, 8, "int8", 1, tmp_path)
    assert full_ms > 2 * small_ms  # the MLP dominates: the test's premise
    target = math.sqrt(full_ms * small_ms)
    out = tmp_path / "out"
    args = ("--target-latency-ms", f"{target:.4f}", "--batch", "8", "--steps", "0")
    result = mla("compress", src, *args, "--out", out, "--val-windows", "16", "--candidates", "1")
    report = json.loads((out / "compress_report.json").read_text())
    probed = report["candidates_latency_probed"]
    chosen = report["deployed"]
    assert chosen["ffn_keep"] < 2048 and chosen["probe_latency_ms"] <= target
    # every probed shape larger than the chosen one missed the target: the least aggressive
    assert all(c["probe_latency_ms"] > target for c in probed if c["params"] > chosen["params"])
    if result.returncode:  # the deployed file re-timed over the target on a loaded machine
        assert result.returncode == 2 and "over --target-latency-ms" in result.stderr


def test_recovery_through_the_ray_trainer(teacher, tmp_path):
    """--recovery ray distils the pruned shape with `mla train`'s launcher (embedded Ray, one
    worker) and deploys the student it trained: lower loss than the pruned weights alone."""
    out = tmp_path / "ray"
    args = ("--ffn-keep", "64", "--groups-keep", "1", "--precision", "fp32", "--recovery", "ray")
    result = mla("compress", teacher, *args, "--out", out, *FAST[:1], "8", *FAST[2:], "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    row = report["distilled"][0]
    assert row["distill_steps_kept"] == 8 and row["distilled_val_loss"] < row["masked_val_loss"]
    assert "distill: teacher export" in result.stderr and not (out / "recovery").exists()


def test_out_that_would_delete_the_source_and_other_bad_runs_are_refused(teacher, tmp_path):
    """Found by a new user: `--out SOURCE --overwrite` deleted the trained run; `--lr inf` trained
    on NaN into a traceback; an unwritable --out and an exit in a 1-block model misread."""
    before = sorted(p.name for p in teacher.iterdir())
    cases = [
        (("--out", teacher, "--overwrite"), "would delete the trained model"),
        (("--out", teacher.parent, "--overwrite"), "would delete the trained model"),
        (("--out", tmp_path / "o", "--lr", "inf"), "--lr=inf must be a finite learning rate"),
        (
            ("--out", tmp_path / "o", "--layers-keep", "1", "--early-exit", "1"),
            "no early exit is possible in a model of 1 block",
        ),
    ]
    for args, message in cases:
        result = mla("compress", teacher, "--target-mb", "1", *FAST, *args)
        assert result.returncode == 2, (args, result.stderr[-1500:])
        assert message in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert sorted(p.name for p in teacher.iterdir()) == before
    assert list(tmp_path.iterdir()) == []


def test_sigterm_mid_run_leaves_no_staging_folder(teacher, tmp_path):
    """`kill PID` (SIGTERM) stops `mla compress` the way Ctrl-C does: the staging folder of the
    atomic output is removed (Python's default SIGTERM left `.tmp-out-*` behind)."""
    import signal
    import time

    cmd = [*MLA, "compress", str(teacher), "--target-mb", "1", *FAST, "--out", str(tmp_path / "o")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.time() + 180
    while not list(tmp_path.glob(".tmp-o-*")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert list(tmp_path.glob(".tmp-o-*")), "the staging folder never appeared"
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode != 0 and b"Traceback" not in stderr, stderr[-2000:]
    assert list(tmp_path.iterdir()) == []
