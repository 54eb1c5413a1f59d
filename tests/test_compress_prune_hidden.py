"""Structured pruning of hidden channels and whole layers (mla.compress): the physically pruned
model equals the original with the removed channels zeroed and the removed blocks skipped; the
importance picks the channels and layers that carry signal; impossible shapes are refused; the
pruned model is an ordinary model that saves, reloads, trains and exports."""

import pytest
import torch
import torch.nn.functional as F

from mla.compress.importance import Importance, measure_importance
from mla.compress.prune import (
    apply_pruning,
    masked,
    plan_config,
    plan_pruning,
    pruned_config,
    shape_problems,
)
from mla.config import ModelConfig
from mla.flops import count_parameters
from mla.model import MLATransformer
from mla.pretrained import load_pretrained, save_pretrained
from tests.test_compress_prune import BASE as PRUNE_BASE

BASE = {**PRUNE_BASE, "n_layers": 3}  # the MLP/head pruning tests' model, one block deeper
#: Logit tolerance of pruned vs masked (float32 rounding of sums over fewer terms, logits ~1).
ATOL, RTOL = 2e-5, 1e-4


def _model(**kw) -> MLATransformer:
    torch.manual_seed(0)
    model = MLATransformer(ModelConfig(**{**BASE, **kw})).eval()
    with torch.no_grad():  # norm weights away from 1, so a missing rescale would show
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model


def _batches(n: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 256, (2, 64), generator=g) for _ in range(n)]


SHAPES = {  # (ffn_keep, groups_keep, hidden_keep, layers_keep)
    "hidden": (96, 4, 48, None),
    "layers": (96, 4, None, 2),
    "hidden+layers": (96, 4, 40, 2),
    "all": (48, 2, 44, 2),
}


@pytest.mark.parametrize("attention", ["mla", "dense"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_pruned_model_equals_masked_original(attention, shape):
    model = _model(attention=attention)
    f, g, h, layers = SHAPES[shape]
    plan = plan_pruning(measure_importance(model, _batches()), model.cfg, f, g, 1, h, layers)
    small = apply_pruning(model, plan)
    x = _batches(1)[0]
    with torch.no_grad():
        with masked(model, plan):
            want = model(x)
        full = model(x)
        got = small(x)
    assert small.cfg == plan_config(model.cfg, plan)
    assert small.cfg.d_model == (h or 64) and small.cfg.n_layers == (layers or 3)
    assert small.cfg.head_dim == 8 and small.cfg.kv_heads == g
    assert count_parameters(small.cfg) == sum(p.numel() for p in small.parameters())
    assert count_parameters(small.cfg) < count_parameters(model.cfg)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)
    assert (full - want).abs().max() > 1e-3  # masking changed the function: the test can fail
    assert len(model.blocks) == 3  # masked() restored the blocks


def test_without_the_norm_rescale_the_pruned_model_differs():
    """The sqrt(d/d') fold and the eps scaling are what make the equivalence exact."""
    model = _model()
    plan = plan_pruning(measure_importance(model, _batches()), model.cfg, 96, 4, 1, 32)
    small = apply_pruning(model, plan)
    x = _batches(1)[0]
    with torch.no_grad():
        with masked(model, plan):
            want = model(x)
        for name, p in small.named_parameters():
            if name.endswith("norm.weight"):
                p.div_(2**0.5)  # undo sqrt(64 / 32)
        assert (small(x) - want).abs().max() > 1e-2


def test_importance_picks_the_channels_and_layers_that_carry_signal():
    model = _model()
    with torch.no_grad():
        model.tok_emb.weight[:, 5] *= 30.0  # hidden channel 5 dominates every norm output
        for b in (model.blocks[0], model.blocks[2]):
            b.attn.wo.weight *= 40.0  # blocks 0 and 2 turn the residual stream, block 1 barely
            b.mlp.w2.weight *= 40.0
    imp = measure_importance(model, _batches())
    assert imp.hidden is not None and imp.layers is not None
    assert imp.hidden.shape == (64,) and int(imp.hidden.argmax()) == 5
    assert imp.layers.shape == (3,) and int(imp.layers.argmin()) == 1
    assert bool(((imp.layers >= 0) & (imp.layers <= 2)).all())
    plan = plan_pruning(imp, model.cfg, 96, 4, 1, 1, 2)
    assert plan.hidden_index.tolist() == [5] and plan.layer_index.tolist() == [0, 2]


def test_importance_without_hidden_scores_stays_usable_for_width_pruning():
    model = _model()
    imp = measure_importance(model, _batches(1))
    old = Importance(imp.ffn, imp.heads, imp.groups, imp.tokens)  # as callers built it before
    plan = plan_pruning(old, model.cfg, 48, 2)
    assert plan.hidden_index is None and plan.layer_index is None
    with pytest.raises(ValueError, match="Importance.hidden"):
        plan_pruning(old, model.cfg, 48, 2, 1, 32)


@pytest.mark.parametrize(
    ("hidden", "layers", "tp", "field"),
    [
        (0, None, 1, "hidden_keep=0 must be in [1, d_model=64] (pruning every hidden channel"),
        (65, None, 1, "hidden_keep=65 must be in [1, d_model=64]"),
        (None, 0, 1, "layers_keep=0 must be in [1, n_layers=3] (pruning every layer"),
        (None, 4, 1, "layers_keep=4 must be in [1, n_layers=3]"),
    ],
)
def test_impossible_hidden_and_layer_shapes_are_refused(hidden, layers, tp, field):
    cfg = ModelConfig(**BASE)
    assert any(field in p for p in shape_problems(cfg, 96, 4, tp, hidden, layers))
    imp = measure_importance(_model(), _batches(1))
    with pytest.raises(ValueError, match="cannot prune"):
        plan_pruning(imp, cfg, 96, 4, tp, hidden, layers)


def test_a_hidden_width_no_head_count_or_tp_degree_divides_is_a_valid_model():
    """d_model is replicated across tensor ranks and the head width is pinned, so an odd
    hidden width (37: prime) builds, keeps head_dim 8 and still splits heads over tp 2."""
    cfg = ModelConfig(**BASE)
    assert shape_problems(cfg, 48, 2, 2, 37, 1) == []
    small = pruned_config(cfg, 48, 2, 37, 1)
    assert (small.d_model, small.head_dim, small.n_heads, small.kv_heads) == (37, 8, 4, 2)
    assert small.norm_eps == pytest.approx(1e-5 * 64 / 37)
    assert ModelConfig(**small.to_dict()) == small
    assert "groups_keep=3 is not divisible by tp(2)" in " ".join(
        shape_problems(cfg, 48, 3, 2, 37, 1)
    )


def test_hidden_and_layer_pruned_model_saves_reloads_and_trains(tmp_path):
    model = _model()
    plan = plan_pruning(measure_importance(model, _batches()), model.cfg, 48, 2, 1, 40, 2)
    small = apply_pruning(model, plan)
    save_pretrained(small, tmp_path / "export")
    again = load_pretrained(tmp_path / "export")
    x = _batches(1)[0]
    assert again.cfg == small.cfg and again.cfg.d_model == 40 and again.cfg.n_layers == 2
    with torch.no_grad():
        torch.testing.assert_close(again(x), small(x), atol=0, rtol=0)
    again.train()
    opt = torch.optim.AdamW(again.parameters(), lr=1e-2)
    before = [p.detach().clone() for p in again.parameters()]
    loss = F.cross_entropy(again(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    assert all(not torch.equal(a, b) for a, b in zip(before, again.parameters(), strict=True))


@pytest.mark.slow  # ONNX export: ~12 s
def test_hidden_and_layer_pruned_model_exports_to_onnx(tmp_path):
    pytest.importorskip("onnxruntime")
    from mla.compress.onnx_export import OnnxLM, export_onnx

    model = _model(attention="dense")
    plan = plan_pruning(measure_importance(model, _batches()), model.cfg, 48, 2, 1, 40, 2)
    small = apply_pruning(model, plan)
    x = _batches(1)[0]
    path = export_onnx(small, tmp_path / "m.onnx", seq_len=64)
    got = OnnxLM(path)(x.numpy())
    with torch.no_grad():
        want = small(x).numpy()
    assert abs(got - want).max() < 1e-4


@pytest.mark.parametrize("attention", ["mla", "dense"])
def test_hidden_and_layer_pruned_model_decodes_with_its_kv_cache(attention):
    """Incremental decoding (mla.decoding) of the pruned model gives the full forward's logits."""
    from mla.decoding import decode_step, prefill

    model = _model(attention=attention)
    plan = plan_pruning(measure_importance(model, _batches()), model.cfg, 48, 2, 1, 40, 2)
    small = apply_pruning(model, plan)
    x = _batches(1)[0][:, :24]
    with torch.no_grad():
        full = small(x)
        state, logits = prefill(small, x[:, :16], capacity=24)
        steps = [decode_step(small, x[:, t : t + 1], state) for t in range(16, 24)]
    torch.testing.assert_close(logits[:, -1], full[:, 15], atol=1e-4, rtol=1e-4)
    for t, step in zip(range(16, 24), steps, strict=True):
        torch.testing.assert_close(step.reshape(2, -1), full[:, t], atol=1e-4, rtol=1e-4)
