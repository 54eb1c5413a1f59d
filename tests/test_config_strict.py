"""Strict job config: no bool for a number, finite floats, seed >= 0, betas in [0, 1), no
duplicate YAML keys, non-UTF-8 files as messages (vocabulary padding: test_vocab_padding.py)."""

from __future__ import annotations

import pytest

from orchestrator.config import load_job_config
from orchestrator.contract.errors import ConfigError


@pytest.mark.parametrize(
    "override, words",
    [
        ("train.steps=true", ["train", "steps=true is a boolean"]),
        ("cluster.num_workers=false", ["cluster", "num_workers=false is a boolean"]),
        ("train.lr=.inf", ["train.lr", "finite"]),
        ("train.grad_clip=.inf", ["train.grad_clip", "finite"]),
        ("train.weight_decay=.nan", ["train.weight_decay", "finite"]),
        ("train.seed=-5", ["train.seed", "greater than or equal to 0"]),
        ("train.betas=[2, 3]", ["train.betas=[2.0, 3.0]", "[0, 1)"]),
        ("model.max_seq_len=64", ["model.max_seq_len(64) < data.seq_len(128)", "at least 128"]),
    ],
)
def test_bad_values_are_refused_naming_the_field(override, words):
    with pytest.raises(ConfigError) as err:
        load_job_config("configs/tiny.yaml", [override])
    for word in words:
        assert word in str(err.value)


def test_unset_max_seq_len_follows_data_seq_len_and_an_explicit_larger_one_is_kept():
    assert (
        load_job_config("configs/tiny.yaml", ["data.seq_len=300"]).model_config_().max_seq_len
        == 300
    )
    job = load_job_config("configs/tiny.yaml", ["model.max_seq_len=512"])
    assert job.model_config_().max_seq_len == 512


def test_bools_stay_valid_for_bool_fields_and_warmup_zero_is_allowed():
    job = load_job_config(
        "configs/tiny.yaml", ["cluster.use_gpu=false", "train.warmup_steps=0", "train.seed=0"]
    )
    assert job.cluster.use_gpu is False and job.train.warmup_steps == 0


def test_duplicate_yaml_key_is_refused_with_its_line(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("train:\n  steps: 10\n  lr: 0.001\n  steps: 20\n")
    with pytest.raises(ConfigError, match="key 'steps' appears twice.*line 2"):
        load_job_config(path)


def test_non_utf8_yaml_is_a_message(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("run:\n  name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="not a UTF-8 text file"):
        load_job_config(path)


@pytest.mark.parametrize(
    "args, words",
    [
        (["--peak-tflops", "-5"], "--peak-tflops -5.0: must be greater than 0"),
        (["--global-batch", "0"], "--global-batch 0: must be at least 1"),
        (["--efficiency", "0"], "--efficiency 0.0: the achievable fraction"),
        (["--efficiency", "1.5"], "--efficiency 1.5"),
        (["--intra-node-gbs", "0"], "--intra-node-gbs 0.0: must be greater than 0"),
        (["--inter-node-gbs", "nan"], "--inter-node-gbs nan: give a finite number"),
        (["--memory-gib", "-1"], "--memory-gib -1.0"),
        (["--gpus", "0"], "--gpus 0: must be at least 1"),
        (["--precision", "fp8"], "--precision 'fp8'"),
    ],
)
def test_mla_plan_checks_every_number(args, words):
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "plan", "--model", "7b", "--gpus", "8", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2, out.stderr
    assert words in out.stderr and "Traceback" not in out.stderr


def test_fp32_memory_counts_fp32_activations_and_zero3_gradients():
    from mla.config import PRESETS
    from orchestrator.contract.layout import Layout
    from orchestrator.planner.memory import memory_per_gpu

    cfg = PRESETS["7b"]
    layout = Layout(dp=8, zero_stage=3, micro_batch=1, grad_accum=1)
    fp32, bf16 = (
        memory_per_gpu(cfg, 2048, layout, "fp32"),
        memory_per_gpu(cfg, 2048, layout, "bf16"),
    )
    logits = 2048 * cfg.vocab_size  # s * b * V
    assert fp32.activations - 8 * logits == pytest.approx(2 * (bf16.activations - 6 * logits))
    assert fp32.gradients == pytest.approx(
        4 * fp32.parameters / 4
    )  # 4-byte grads partitioned like params
    assert fp32.gradients > 0
