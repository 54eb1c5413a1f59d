"""The exported metric catalogue and the worker-side helpers: valid Prometheus names, no
unbounded labels, Ray Train's tag names, the MFU formula, the device peak in the run plan, and
the per-layer gate probe on a real model."""

from __future__ import annotations

import math
import re

import pytest

from orchestrator.contract.layout import Layout
from orchestrator.contract.metrics import (
    METRICS,
    RANK_LABEL,
    RUN_LABEL,
    exported_series_names,
    layout_label,
)
from workers.metrics import TrainMetrics, mfu, peak_memory_bytes

NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")  # Ray drops (with a warning only) anything else


def test_names_are_valid_prefixed_and_unique():
    names = [s.name for s in METRICS]
    assert len(set(names)) == len(names)
    assert all(NAME.match(n) and n.startswith("mla_") for n in names)
    assert all(n.startswith("ray_mla_") for n in exported_series_names())


def test_labels_are_ray_trains_tags_and_never_step_head_or_token():
    for spec in METRICS:
        assert spec.labels[0] == RUN_LABEL
        assert not {"step", "head", "token"} & set(spec.labels), spec.name
    per_rank = {s.name for s in METRICS if RANK_LABEL in s.labels}
    assert per_rank == {
        "mla_train_step",
        "mla_train_tokens",
        "mla_train_step_seconds",
        "mla_train_data_wait_seconds",
        "mla_train_device_memory_peak_bytes",
    }


def test_counter_and_histogram_names_as_ray_exports_them():
    names = exported_series_names()
    assert "ray_mla_train_tokens_total" in names and "ray_mla_train_tokens" not in names
    assert {f"ray_mla_train_step_seconds_{s}" for s in ("bucket", "count", "sum")} <= names


def test_layout_label():
    layout = Layout(dp=2, tp=2, pp=1, zero_stage=1, micro_batch=4, grad_accum=1)
    assert layout_label(layout) == "dp2.tp2.pp1.z1"


def test_mfu_formula_and_unknown_peak():
    # docstring example: 5.62e6 FLOPs/token x 3,000 tokens/s / (1e11 FLOP/s x 2 workers)
    assert mfu(5.62e6, 3000.0, 1e11, 2) == pytest.approx(0.0843)
    assert math.isnan(mfu(5.62e6, 3000.0, 0.0, 2))


def test_run_plan_carries_the_device_peak(tiny_job):
    from orchestrator.layouts import build_run_plan

    assert build_run_plan(tiny_job()).peak_flops == 0.1e12  # the catalogue's rough cpu entry
    gpu = build_run_plan(tiny_job("cluster.use_gpu=true", "cluster.gpu=h100"))
    assert gpu.peak_flops == pytest.approx(989.4e12)  # bf16 dense


def test_peak_memory_on_cpu_is_the_process_peak_rss():
    first = peak_memory_bytes(False)
    blob = bytearray(64 * 1024 * 1024)  # touch 64 MiB
    blob[::4096] = b"x" * len(blob[::4096])
    assert peak_memory_bytes(False) >= first and peak_memory_bytes(False) > 64 * 1024 * 1024


def test_metrics_are_a_no_op_outside_ray():
    layout = Layout(dp=2, tp=1, pp=1, zero_stage=2, micro_batch=4, grad_accum=1)
    metrics = TrainMetrics("tiny", 0, layout)
    assert not metrics.enabled
    metrics.interval({"step": 1, "loss": 2.0}, [0.1], 100, 1)  # nothing raised, nothing sent
    metrics.close()


def test_gate_probe_averages_each_layers_gate(one_torch_thread):
    import torch

    from mla.config import ModelConfig
    from mla.model import MLATransformer
    from workers.gate_probe import GateProbe

    cfg = ModelConfig(
        vocab_size=64,
        d_model=32,
        n_layers=3,
        n_heads=2,
        ffn_hidden=64,
        local_window=4,
        global_k=4,
        block_size=4,
    )
    model = MLATransformer(cfg).eval()
    tokens = torch.randint(0, 64, (2, 16))
    with GateProbe(model) as probe, torch.no_grad():
        model(tokens)
    means = probe.means()
    assert sorted(means) == [0, 1, 2] and all(0.0 < v < 1.0 for v in means.values())
    # the probe's number is the mean of sigmoid(w_gate(x)) that the layer itself used
    captured = {}
    handle = model.blocks[1].attn.register_forward_pre_hook(
        lambda m, a: captured.setdefault("x", a[0])
    )
    with torch.no_grad():
        model(tokens)
    handle.remove()
    with torch.no_grad():
        gate = torch.sigmoid(model.blocks[1].attn.w_gate(captured["x"]))
    assert means[1] == pytest.approx(float(gate.mean()), rel=1e-5)
    assert not model.blocks[1].attn.w_gate._forward_hooks  # hooks removed on exit
