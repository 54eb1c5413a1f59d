"""Layout-independent checkpoints: a run saved at step 10 under (dp, tp, pp) = (1, 2, 2)
resumes under (4, 1, 1) and under (2, 1, 1), model and AdamW state both, and its losses of
steps 11-20 match an uninterrupted single-process run within 1e-3 relative."""

from __future__ import annotations

import json

import pytest
import torch

from tests.harness.parity import ParityRun, parity_layout, reference_run, run_parity
from workers.parallel.reshard import read_consolidated

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def saved_under_tp2_pp2(tmp_path_factory):
    folder = tmp_path_factory.mktemp("reshard")
    out = run_parity(ParityRun(parity_layout(1, 2, 2), steps=10, save_at=10, save_dir=str(folder)))
    return folder / "step_10", out["losses"]


def test_consolidated_checkpoint_holds_full_tensors(saved_under_tp2_pp2):
    folder, _ = saved_under_tp2_pp2
    state, tensors = read_consolidated(folder)
    assert state["adam_step"] == 10 and state["client_state"] == {"step": 10}
    assert state["layout"]["tp"] == 2 and state["layout"]["pp"] == 2
    assert sorted(p.name for p in folder.glob("stage_*.pt")) == ["stage_000.pt", "stage_001.pt"]
    assert tensors["param"]["blocks.0.attn.wq.weight"].shape == (128, 128)  # both tensor shards
    assert tensors["param"]["tok_emb.weight"].shape == (256, 128)  # both vocabulary shards
    assert float(tensors["exp_avg_sq"]["blocks.3.mlp.w2.weight"].abs().sum()) > 0
    assert (
        json.loads((folder / "state.json").read_text())["scheduler"] is None
    )  # lr is a function of the step


@pytest.mark.parametrize("dp, tp, pp", [(4, 1, 1), (2, 1, 1)])
def test_resume_under_another_layout_continues_the_loss_curve(saved_under_tp2_pp2, dp, tp, pp):
    folder, first = saved_under_tp2_pp2
    ref = reference_run(20)["losses"]
    assert max(abs(a - b) / b for a, b in zip(first, ref[:10], strict=False)) < 1e-3
    out = run_parity(ParityRun(parity_layout(dp, tp, pp), steps=20, resume_from=str(folder)))
    assert out["start"] == 10 and len(out["losses"]) == 10
    rel = max(abs(a - b) / b for a, b in zip(out["losses"], ref[10:], strict=True))
    print(f"(1, 2, 2) -> ({dp}, {tp}, {pp}): steps 11-20 max relative loss difference {rel:.2e}")
    assert rel < 1e-3


def test_without_optimizer_state_the_curve_differs(saved_under_tp2_pp2, tmp_path):
    """The resume test can fail: dropping AdamW's moments changes the losses of steps 11-20."""
    folder, _ = saved_under_tp2_pp2
    state, tensors = read_consolidated(folder)
    stripped = tmp_path / "stripped"
    stripped.mkdir()
    (stripped / "state.json").write_text(json.dumps(state))
    for path in folder.glob("stage_*.pt"):
        data = torch.load(path, weights_only=True)
        data["exp_avg"] = {k: torch.zeros_like(v) for k, v in data["exp_avg"].items()}
        data["exp_avg_sq"] = {k: torch.zeros_like(v) for k, v in data["exp_avg_sq"].items()}
        torch.save(data, stripped / path.name)
    out = run_parity(ParityRun(parity_layout(dp=2), steps=12, resume_from=str(stripped)))
    ref = reference_run(20)["losses"]
    assert max(abs(a - b) / b for a, b in zip(out["losses"], ref[10:12], strict=False)) > 1e-3
