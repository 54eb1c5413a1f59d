"""Frozen parameters under real DeepSpeed engines: bit-identical after training, no AdamW state,
the trainable ones changed, and a pipeline layout trains the same frozen model as one process."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mla.config import PRESETS
from mla.freeze import frozen_parameters, parameter_shapes
from tests.harness.parity import ParityRun, parity_layout, run_parity
from workers.parallel.reshard import read_consolidated

pytestmark = pytest.mark.slow

STEPS = 3
SHAPES = parameter_shapes(PRESETS["tiny"])


def _train(tmp: Path, layout, frozen: frozenset[str]) -> tuple[list[float], dict]:
    out = run_parity(
        ParityRun(layout, steps=STEPS, save_at=STEPS, save_dir=str(tmp), frozen=frozen)
    )
    assert out["frozen_with_grad"] == []
    return out["losses"], read_consolidated(tmp / f"step_{STEPS}")[1]


def _initial(tmp: Path) -> dict[str, torch.Tensor]:
    run_parity(ParityRun(steps=0, save_at=0, save_dir=str(tmp)))
    return read_consolidated(tmp / "step_0")[1]["param"]


def _check(initial: dict, final: dict, frozen: frozenset[str]) -> None:
    for name in SHAPES:
        unchanged = torch.equal(initial[name], final["param"][name])
        assert unchanged == (name in frozen), name
        if name in frozen:  # no optimizer state was ever created for it
            assert not final["exp_avg"][name].any() and not final["exp_avg_sq"][name].any()


def test_last_layer_and_head_train_the_rest_stays_bit_identical(tmp_path):
    frozen = frozen_parameters(SHAPES, 4, trainable_last_layers=1)
    assert "blocks.3.attn.wq.weight" not in frozen and "blocks.2.mlp.w1.weight" in frozen
    _, final = _train(tmp_path / "run", parity_layout(), frozen)
    _check(_initial(tmp_path / "init"), final, frozen)


def test_data_parallel_without_zero_reduces_no_frozen_gradient(tmp_path):
    # ZeRO-0 all-reduces every parameter it is given a gradient slot for (DeepSpeed creates a
    # zero gradient for one that has none): a frozen parameter must not be among them
    frozen = frozen_parameters(SHAPES, 4, trainable_last_layers=2, train_head=False)
    single, _ = _train(tmp_path / "single", parity_layout(), frozen)
    losses, final = _train(tmp_path / "dp2", parity_layout(dp=2, zero_stage=0), frozen)
    _check(_initial(tmp_path / "init"), final, frozen)
    assert losses == pytest.approx(single, abs=1e-5)


def test_pipeline_with_a_frozen_tied_embedding_matches_one_process(tmp_path):
    # (pp=2: the tied embedding/head lives on both stages and is frozen; stage 0 keeps block 1)
    frozen = frozen_parameters(SHAPES, 4, patterns=["blocks.0.*"], train_head=False)
    single, _ = _train(tmp_path / "single", parity_layout(), frozen)
    losses, final = _train(tmp_path / "pp2", parity_layout(pp=2), frozen)
    _check(_initial(tmp_path / "init"), final, frozen)
    assert losses == pytest.approx(single, abs=1e-5)


def test_init_from_an_export_lands_whole_in_a_tensor_parallel_engine(tmp_path):
    from mla.model import MLATransformer
    from mla.pretrained import save_pretrained

    torch.manual_seed(7)
    source = MLATransformer(PRESETS["tiny"])
    save_pretrained(source, tmp_path / "export")
    run = ParityRun(
        parity_layout(tp=2),
        steps=0,
        save_at=0,
        save_dir=str(tmp_path / "tp2"),
        init_from=("export", str(tmp_path / "export")),
    )
    run_parity(run)  # loads the shards, then gathers them back into a consolidated checkpoint
    loaded = read_consolidated(tmp_path / "tp2" / "step_0")[1]["param"]
    for name, p in source.named_parameters():
        assert torch.equal(loaded[name], p.detach()), name


def test_a_frozen_run_resumes_under_another_layout_with_the_same_losses(tmp_path):
    frozen = frozen_parameters(SHAPES, 4, trainable_last_layers=1)
    whole = run_parity(ParityRun(steps=STEPS, save_at=2, save_dir=str(tmp_path), frozen=frozen))
    resumed = run_parity(
        ParityRun(
            parity_layout(dp=2),
            steps=STEPS,
            resume_from=str(tmp_path / "step_2"),
            frozen=frozen,
        )
    )
    assert resumed["start"] == 2
    assert resumed["losses"] == pytest.approx(whole["losses"][2:], abs=1e-5)
