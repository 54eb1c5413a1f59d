"""`mla compress` settings: bad targets are refused with a message naming the option, before
any work (in process; the CLI's exit status 2 is tested in test_compress_cli.py)."""

import pytest

from mla.config import ModelConfig
from orchestrator.contract.errors import ConfigError
from tests.compress_fixture import SHAPE
from workers.compress import CompressSettings, check_against_model, check_settings

CFG = ModelConfig(**{**SHAPE, "attention": "dense"})


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({}, "nothing to fit"),
        ({"target_mb": 0.0}, "--target-mb=0 must be a positive size"),
        ({"target_mb": -1.0}, "--target-mb=-1 must be a positive size"),
        ({"target_latency_ms": 0.0}, "--target-latency-ms=0 must be a positive time"),
        ({"target_latency_ms": float("inf")}, "--target-latency-ms=inf must be a positive time"),
        ({"target_mb": 1.0, "latency_batch": 0}, "--batch=0 must be >= 1"),
        ({"target_mb": 1.0, "qat_steps": -1}, "--qat-steps=-1 must be >= 0"),
        ({"target_mb": 1.0, "qat_steps": 3, "precision": "fp32"}, "simulates INT8"),
    ],
)
def test_bad_settings_are_refused(kw, message):
    with pytest.raises(ConfigError, match=message.replace("(", "\\(")):
        check_settings(CompressSettings(**kw))


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"groups_keep": 0}, "pruning every head leaves no attention"),
        ({"ffn_keep": 0}, "pruning every MLP neuron leaves no MLP"),
        ({"groups_keep": 1, "tp": 2}, "--groups-keep=1 is not divisible by tp\\(2\\)"),
        ({"target_mb": 0.005}, "below what this model takes with every prunable unit removed"),
    ],
)
def test_targets_this_model_cannot_meet_are_refused(kw, message):
    s = CompressSettings(**kw)
    check_settings(s)
    with pytest.raises(ConfigError, match=message):
        check_against_model(s, CFG, 64)


def test_a_latency_below_the_empty_model_is_refused_with_the_measured_floor():
    pytest.importorskip("onnxruntime")
    s = CompressSettings(target_latency_ms=1e-6)
    with pytest.raises(ConfigError, match=r"below what an empty model takes .* ms measured"):
        check_against_model(s, CFG, 64)
    measured = check_against_model(CompressSettings(target_latency_ms=1e4), CFG, 64)
    assert 0 < measured["empty_model_latency_ms"] < 1e4
