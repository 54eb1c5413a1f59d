"""Fine-tuning input checked before launch: freeze rules, ``model.init_from`` sources, counts."""

from __future__ import annotations

import json
import shutil

import pytest

from mla.config import ModelConfig
from mla.freeze import count_trainable, frozen_parameters, parameter_shapes
from mla.pretrained import save_pretrained
from orchestrator.config import load_job_config
from orchestrator.contract.errors import CheckpointError, ConfigError
from orchestrator.finetune import plan_finetune
from tests.checkpoint_fixture import TINY, write_run

NAMES = list(parameter_shapes(ModelConfig(**TINY)))  # 2 blocks


def _job(*sets: str):
    return load_job_config(None, ["model.preset=tiny", *sets])


def test_last_layers_keep_the_last_blocks_and_the_tied_head():
    frozen = frozen_parameters(NAMES, 2, trainable_last_layers=1)
    assert all(n.startswith("blocks.0.") for n in frozen)
    assert {n for n in NAMES if n.startswith("blocks.0.")} == frozen
    without_head = frozen_parameters(NAMES, 2, trainable_last_layers=1, train_head=False)
    assert without_head == frozen | {"tok_emb.weight", "norm.weight"}


def test_patterns_match_dotted_names():
    frozen = frozen_parameters(NAMES, 2, patterns=["*.attn.w_gate.*", "tok_emb.weight"])
    assert frozen == {
        "blocks.0.attn.w_gate.weight",
        "blocks.0.attn.w_gate.bias",
        "blocks.1.attn.w_gate.weight",
        "blocks.1.attn.w_gate.bias",
        "tok_emb.weight",
    }


def test_a_pattern_matching_nothing_is_named():
    with pytest.raises(ValueError, match=r"pattern 'blocks\.9\.\*' matches no parameter"):
        frozen_parameters(NAMES, 2, patterns=["blocks.0.*", "blocks.9.*"])


def test_too_many_last_layers_and_freezing_everything_are_refused():
    with pytest.raises(ValueError, match=r"trainable_last_layers\(3\).*n_layers\(2\)"):
        frozen_parameters(NAMES, 2, trainable_last_layers=3)
    with pytest.raises(ValueError, match="nothing would train") as refused:
        frozen_parameters(NAMES, 2, trainable_last_layers=0, train_head=False)
    assert "set train.train_head=true" in str(refused.value)
    with pytest.raises(ValueError, match="nothing would train") as refused:
        frozen_parameters(NAMES, 2, patterns=["*"], train_head=True)
    assert "train_head=true" not in str(refused.value)  # it is already true
    with pytest.raises(ConfigError, match="trainable_last_layers"):
        _job("train.trainable_last_layers=-1")


def test_counts_and_the_job_level_plan():
    plan = plan_finetune(_job("train.trainable_last_layers=1", "train.train_head=false"))
    shapes = parameter_shapes(_job().model_config_())
    block = sum(
        _numel(s) for n, s in shapes.items() if n.startswith("blocks.3.")
    )  # the tiny preset has 4 blocks
    assert plan.trainable_parameters == block
    assert plan.total_parameters == sum(_numel(s) for s in shapes.values())
    assert count_trainable(shapes, ()) == (plan.total_parameters, plan.total_parameters)
    with pytest.raises(ConfigError, match=r"trainable_last_layers\(5\)"):
        plan_finetune(_job("train.trainable_last_layers=5"))
    with pytest.raises(ConfigError, match="zero_stage=3"):
        plan_finetune(_job("train.freeze=[norm.weight]"), [_Zero3()])


class _Zero3:
    zero_stage = 3


def _numel(shape) -> int:
    out = 1
    for d in shape:
        out *= d
    return out


def _tiny_job(source, **model):
    sets = [f"model.{k}={v}" for k, v in {**TINY, **model}.items()]
    return load_job_config(None, [*sets, "data.seq_len=64", f"model.init_from={source}"])


def test_init_from_a_run_folder_uses_its_verified_checkpoint(tmp_path):
    run, _ = write_run(tmp_path, step=7)
    plan = plan_finetune(_tiny_job(run))
    assert plan.init_kind == "checkpoint" and plan.init_step == 7
    assert plan.init_from.endswith("step_0000007")


def test_init_from_an_export(tmp_path):
    _, model = write_run(tmp_path)
    save_pretrained(model, tmp_path / "export")
    plan = plan_finetune(_tiny_job(tmp_path / "export"))
    assert plan.init_kind == "export" and plan.init_step is None


def test_a_shape_mismatch_names_the_first_parameter_both_shapes_and_the_field(tmp_path):
    run, _ = write_run(tmp_path)
    with pytest.raises(ConfigError) as info:
        plan_finetune(_tiny_job(run, d_model=64))
    text = str(info.value)
    assert "parameter tok_emb.weight has shape (256, 32) in the source and (256, 64)" in text
    assert "model.d_model: 64 here, 32 in the source" in text
    assert "set model.d_model to the source's value" in text


def test_missing_and_unverified_sources_are_refused(tmp_path):
    with pytest.raises(CheckpointError, match="model.init_from: .*does not exist"):
        plan_finetune(_tiny_job(tmp_path / "nope"))
    run, _ = write_run(tmp_path)
    ckpt = run / "checkpoints" / "step_0000010"
    manifest = json.loads((ckpt / "manifest.json").read_text())
    manifest["files"]["meta.json"]["sha256"] = "0" * 64
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="not a complete checkpoint.*SHA-256"):
        plan_finetune(_tiny_job(ckpt))
    shutil.rmtree(ckpt / "consolidated")
    with pytest.raises(CheckpointError, match="holds no complete checkpoint"):
        plan_finetune(_tiny_job(run))


def test_a_pipeline_stage_with_nothing_to_train_is_refused():
    from orchestrator.layouts import build_run_plan
    from workers.parallel.pipeline import stage_prefixes

    assert stage_prefixes(4, 2) == [
        ["tok_emb.", "blocks.0.", "blocks.1."],
        ["blocks.2.", "blocks.3.", "norm.", "tok_emb."],
    ]
    sets = ["parallel.pipeline=2", "parallel.zero_stage=1", "train.trainable_last_layers=1"]
    job = load_job_config("configs/tiny.yaml", [*sets, "train.train_head=false"])
    with pytest.raises(ConfigError, match=r"pipeline=2 stage 0 holds only frozen parameters"):
        plan_finetune(job, list(build_run_plan(job).layouts.values()))
    job = load_job_config("configs/tiny.yaml", sets)  # the tied embedding trains on stage 0
    assert plan_finetune(job, list(build_run_plan(job).layouts.values())).frozen


def test_the_fine_tune_example_fits_the_make_train_model():
    tuned = load_job_config("configs/finetune_tiny.yaml")
    assert tuned.model_config_() == load_job_config("configs/tiny.yaml").model_config_()
    assert tuned.model.init_from == "runs/tiny"  # where `make train` writes its run
    plan = plan_finetune(load_job_config("configs/finetune_tiny.yaml", ["model.init_from=null"]))
    assert all(n.startswith(("blocks.0.", "blocks.1.", "tok_emb.", "norm.")) for n in plan.frozen)
    assert plan.trainable_parameters < plan.total_parameters


def test_a_newer_checkpoint_that_fails_verification_is_passed_over_and_named(tmp_path, capsys):
    write_run(tmp_path, step=7)
    run, _ = write_run(tmp_path, step=9)
    (run / "checkpoints" / "step_0000009" / "consolidated" / "stage_000.pt").unlink()
    plan = plan_finetune(_tiny_job(run))
    assert plan.init_step == 7
    warning = " ".join(capsys.readouterr().err.split())
    assert "model.init_from skipped the newer checkpoint step_0000009" in warning
