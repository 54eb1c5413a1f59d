"""Structured pruning (mla.compress): physical removal == masking, shape checks, explicit head_dim."""

import pytest
import torch

from mla.compress.importance import measure_importance
from mla.compress.prune import apply_pruning, masked, plan_pruning, pruned_config, shape_problems
from mla.config import ModelConfig
from mla.model import MLATransformer
from mla.pretrained import load_pretrained, save_pretrained

BASE = dict(
    vocab_size=256,
    d_model=64,
    n_layers=2,
    n_heads=8,
    n_kv_heads=4,
    ffn_hidden=96,
    max_seq_len=64,
    local_window=8,
    global_k=8,
    block_size=8,
)


def _model(**kw) -> MLATransformer:
    torch.manual_seed(0)
    return MLATransformer(ModelConfig(**{**BASE, **kw})).eval()


def _batches(n: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 256, (2, 64), generator=g) for _ in range(n)]


@pytest.mark.parametrize(
    "kw", [{}, {"attention": "dense"}, {"n_kv_heads": None, "n_heads": 4}, {"mix": "sum"}]
)
def test_pruned_model_equals_masked_original(kw):
    model = _model(**kw)
    plan = plan_pruning(measure_importance(model, _batches()), model.cfg, 40, 2)
    small = apply_pruning(model, plan)
    x = _batches(1)[0]
    with torch.no_grad(), masked(model, plan):
        want = model(x)
    got = small(x)
    assert small.cfg.ffn_hidden == 40 and small.cfg.kv_heads == 2
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    # and masking really changed the function (the test can fail):
    assert (model(x) - want).abs().max() > 1e-3


def test_importance_picks_the_units_that_carry_signal():
    model = _model()
    with torch.no_grad():
        model.blocks[0].mlp.w3.weight[7] *= 50.0  # neuron 7 of layer 0 dominates
        model.blocks[1].attn.wv.weight[3 * 8 : 4 * 8] *= 50.0  # kv head 3 of layer 1
    imp = measure_importance(model, _batches())
    assert int(imp.ffn[0].argmax()) == 7
    assert int(imp.groups[1].argmax()) == 3
    plan = plan_pruning(imp, model.cfg, 1, 1)
    assert plan.ffn_index[0].tolist() == [7] and plan.group_index[1].tolist() == [3]


def test_pruned_config_pins_head_dim_and_keeps_gqa_ratio():
    cfg = ModelConfig(**BASE)
    small = pruned_config(cfg, 48, 1)
    assert (small.n_heads, small.kv_heads, small.head_dim) == (2, 1, 8)
    assert small.attn_head_dim == 8 and small.d_model == 64
    assert pruned_config(cfg, 48, 4).attn_head_dim is None  # heads unchanged: derived rule


def test_default_config_dict_is_unchanged_by_the_new_field():
    cfg = ModelConfig(**BASE)
    assert "attn_head_dim" not in cfg.to_dict()
    assert ModelConfig(**cfg.to_dict()) == cfg
    assert pruned_config(cfg, 48, 2).to_dict()["attn_head_dim"] == 8


@pytest.mark.parametrize(
    ("ffn", "groups", "tp", "field"),
    [
        (96, 0, 1, "groups_keep=0"),  # pruning every head
        (0, 4, 1, "ffn_keep=0"),
        (97, 4, 1, "ffn_keep=97"),
        (96, 5, 1, "groups_keep=5"),
        (96, 3, 2, "groups_keep=3 is not divisible by tp(2)"),
        (95, 4, 2, "ffn_keep=95 is not divisible by tp(2)"),
    ],
)
def test_impossible_shapes_are_refused_naming_the_field(ffn, groups, tp, field):
    cfg = ModelConfig(**BASE)
    assert any(field in p for p in shape_problems(cfg, ffn, groups, tp))
    model = _model()
    imp = measure_importance(model, _batches(1))
    with pytest.raises(ValueError, match="cannot prune"):
        plan_pruning(imp, cfg, ffn, groups, tp)


def test_tp_divisible_shape_is_accepted():
    assert shape_problems(ModelConfig(**BASE), 48, 2, tp=2) == []


def test_pruned_model_exports_reloads_and_trains(tmp_path):
    model = _model()
    small = apply_pruning(
        model, plan_pruning(measure_importance(model, _batches()), model.cfg, 32, 2)
    )
    save_pretrained(small, tmp_path / "export")
    again = load_pretrained(tmp_path / "export")
    x = _batches(1)[0]
    assert again.cfg == small.cfg
    torch.testing.assert_close(again(x), small(x), atol=0, rtol=0)
    again.train()
    loss = torch.nn.functional.cross_entropy(again(x).flatten(0, 1), x.flatten())
    loss.backward()
    assert again.blocks[0].attn.wq.weight.grad is not None


def test_attn_head_dim_must_be_even():
    with pytest.raises(ValueError, match="attn_head_dim=7"):
        ModelConfig(**{**BASE, "attn_head_dim": 7})
