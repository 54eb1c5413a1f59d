"""``train.distill``: the trainer's distillation loss is mla.compress.distill's, the teacher stays
frozen and out of the checkpoint, a pipeline distils like one process, and bad input is refused
before launch."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mla.compress.distill import distillation_loss
from mla.config import PRESETS
from mla.model import MLATransformer
from mla.pretrained import save_pretrained
from orchestrator.contract.distill import DistillPlan
from tests.harness.cli import FAST_OVERRIDES, TINY_CONFIG, MlaCli
from tests.harness.parity import ParityRun, parity_layout, run_parity
from workers.distill import DistillLoss

TEACHER_CFG = PRESETS["tiny"].replace(max_seq_len=128)


def _teacher(folder: Path, seed: int = 0) -> Path:
    """A random teacher with sharp predictions (final norm x 30: logits far from uniform, so
    a student from scratch starts far from it in KL)."""
    torch.manual_seed(seed)
    model = MLATransformer(TEACHER_CFG)
    with torch.no_grad():
        model.norm.weight.mul_(30.0)
    return save_pretrained(model, folder)


def _ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def test_trainer_loss_equals_the_in_process_formula(tmp_path):
    torch.manual_seed(1)
    folder = _teacher(tmp_path / "teacher")
    x = torch.randint(0, 256, (2, 32))
    y = torch.randint(0, 256, (2, 32))
    student_logits = torch.randn(2, 32, 256)
    plan = DistillPlan(str(folder), "export", temperature=2.0, kl_weight=0.5, lm_weight=0.25)
    loss_fn = DistillLoss(_ce, plan, 256, torch.device("cpu"))
    teacher = loss_fn.teacher
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    with torch.no_grad():
        t = teacher(x)
    expected = 0.5 * distillation_loss(student_logits, t, 2.0) + 0.25 * _ce(student_logits, y)
    assert float(loss_fn(student_logits, (y, x))) == pytest.approx(float(expected), abs=1e-6)
    parts = loss_fn.take_metrics(torch.device("cpu"))
    assert parts["kl_loss"] == pytest.approx(float(distillation_loss(student_logits, t, 2.0)))
    assert parts["lm_loss"] == pytest.approx(float(_ce(student_logits, y)))
    # evaluation batches (plain targets) get the ordinary loss, so val_loss compares
    assert float(loss_fn(student_logits, y)) == pytest.approx(float(_ce(student_logits, y)))


@pytest.mark.slow
def test_pipeline_tensor_parallel_and_zero3_distil_like_one_process(tmp_path):
    plan = DistillPlan(str(_teacher(tmp_path / "teacher")), "export", lm_weight=0.5)
    runs = [
        run_parity(ParityRun(parity_layout(**degrees), steps=2, distill=plan))["losses"]
        for degrees in ({}, {"pp": 2}, {"tp": 2}, {"dp": 2, "zero_stage": 3})
    ]
    for other in runs[1:]:
        assert other == pytest.approx(runs[0], abs=1e-5)


def _train(tmp_path: Path, *sets: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return MlaCli()(
        "train", TINY_CONFIG, sets=[f"run.dir={tmp_path}", *FAST_OVERRIDES, *sets], timeout=timeout
    )


@pytest.mark.slow
def test_distillation_run_through_ray_train(tmp_path):
    teacher = _teacher(tmp_path / "teacher")
    before = (teacher / "model.safetensors").read_bytes()
    out = _train(
        tmp_path,
        f"train.distill.teacher={teacher}",
        "train.distill.lm_weight=0.1",
        "train.steps=8",
        "train.lr=1e-2",
        "train.warmup_steps=0",
        "train.log_every=2",
        "model.n_layers=2",
        "model.ffn_hidden=128",
        "parallel.zero_stage=2",
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "distill: teacher export" in out.stderr and "  kl " in out.stderr
    records = [json.loads(line) for line in (tmp_path / "tiny" / "metrics.jsonl").open()]
    kl = [r["kl_loss"] for r in records if "kl_loss" in r]
    assert len(kl) == 4 and kl[-1] < 0.9 * kl[0], kl
    assert all("lm_loss" in r for r in records if "kl_loss" in r)
    assert (teacher / "model.safetensors").read_bytes() == before
    from workers.inference import load_model

    student = load_model(tmp_path / "tiny")
    assert student.cfg.n_layers == 2 and student.cfg.ffn_hidden == 128
    names = {n for n, _ in student.model.named_parameters()}
    assert names == {n for n, _ in MLATransformer(student.cfg).named_parameters()}


def test_bad_teacher_stops_mla_train_before_launch(tmp_path):
    teacher = _teacher(tmp_path / "teacher")
    out = _train(tmp_path, f"train.distill.teacher={teacher}", "model.vocab_size=300", timeout=120)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "the teacher has vocab_size=256 and the student" in " ".join(out.stderr.split())
    assert "Traceback" not in out.stderr and not (tmp_path / "tiny").exists()
    corpus = tmp_path / "corpus.txt"  # a BPE run trains its tokenizer.json into the run folder
    corpus.write_text("def add(a, b):\n    return a + b\n" * 200)
    sets = ("data.tokenizer=bpe", f"data.path={corpus}", "model.vocab_size=300")
    out = _train(tmp_path, f"train.distill.teacher={teacher}", *sets, timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert not (tmp_path / "tiny").exists()  # found by a new user: tokenizer.json was left


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (["train.distill.temperature=2"], "train.distill needs a teacher"),
        (["train.distill.teacher=/no/such/run"], "train.distill.teacher: /no/such/run does not"),
        (["data.seq_len=256"], "the teacher's max_seq_len=128 < data.seq_len=256"),
        (
            ["train.privacy.noise_multiplier=1", "parallel.zero_stage=1"],
            "train.distill with train.privacy",
        ),
    ],
)
def test_bad_distillation_input_is_refused(tmp_path, sets, message):
    from orchestrator.config import load_job_config
    from orchestrator.contract.errors import CheckpointError, ConfigError
    from orchestrator.distill import attach_distill
    from orchestrator.layouts import build_run_plan

    teacher = _teacher(tmp_path / "teacher")
    first = [] if "temperature" in sets[0] else [f"train.distill.teacher={teacher}"]
    with pytest.raises((ConfigError, CheckpointError)) as info:
        job = load_job_config(TINY_CONFIG, [f"run.dir={tmp_path}", *first, *sets])
        attach_distill(job, build_run_plan(job))
    assert message in " ".join(str(info.value).split())


def test_a_pruned_shape_round_trips_through_the_job_schema():
    from orchestrator.config import load_job_config, validate_job_dict

    sets = ["model.attn_head_dim=16", "model.n_kv_heads=2", "model.ffn_hidden=96"]
    job = load_job_config(TINY_CONFIG, sets)
    cfg = job.model_config_()
    assert (cfg.head_dim, cfg.kv_heads, cfg.ffn_hidden) == (16, 2, 96)
    assert validate_job_dict(job.model_dump(mode="json")).model_config_() == cfg
