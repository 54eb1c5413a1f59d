"""The GPU check script's own logic, at toy sizes on CPU (its GPU figures need a GPU)."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import gpu_check

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def smoke(tmp_path):
    args = gpu_check.parse(["--smoke", "--out", str(tmp_path)])
    args.shapes = {"B1-Hq4-Hkv2-d16": (4, 2, 16)}
    args.runs = 2
    yield args, gpu_check.Report(str(tmp_path))
    gpu_check.parse([])  # restore the module's full-size constants


def test_attention_rows_carry_ratio_keys_and_a_passing_prefix_check(smoke):
    args, report = smoke
    gpu_check.bench_attention(report, args, "cpu", torch.float32, (64,), until_s=1e9)
    rows = report.data["sections"]["attention"]["rows"]
    assert [r["pass"] for r in rows] == ["forward", "forward_backward"]
    for r in rows:
        assert r["ratio_dense_over_mla"] == pytest.approx(
            r["dense_ms"][r["dense_best"]] / r["mla_ms"], rel=1e-2, abs=1e-3
        )
        assert (
            r["keys_per_query_mla_max"] == 16 + 16 + 16 and r["keys_per_query_dense_mean"] == 32.5
        )
        assert r["mla_prefix_rel_rms"] < 1e-5
    assert report.data["failures"] == []
    report.write()
    assert json.load(open(report.path))["sections"]["attention"]["rows"][0]["n"] == 64


def test_negative_control_a_wrong_output_is_recorded_as_a_failure(smoke):
    _, report = smoke
    x = gpu_check.make_inputs(4, 2, 16, 64, "cpu", torch.float32)
    out = gpu_check.mla_fn(x).detach()
    assert gpu_check.check_prefix(x, out, report, "good") < 1e-5 and report.data["failures"] == []
    out[..., 10, :] += 1.0
    gpu_check.check_prefix(x, out, report, "bad")
    assert len(report.data["failures"]) == 1 and "bad" in report.data["failures"][0]
