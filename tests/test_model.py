"""MLATransformer: shapes, tied head, exact parameter count, init, training signal, causality."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mla.config import ModelConfig
from mla.model import MLATransformer, TransformerBlock

CONFIGS = {
    "mla-gate": ModelConfig(
        vocab_size=50,
        d_model=32,
        n_layers=2,
        n_heads=4,
        ffn_hidden=48,
        max_seq_len=64,
        local_window=8,
        global_k=4,
        block_size=8,
    ),
    "mla-sum": ModelConfig(
        vocab_size=50,
        d_model=32,
        n_layers=3,
        n_heads=4,
        ffn_hidden=40,
        max_seq_len=64,
        mix="sum",
        indexer="exact",
    ),
    "dense": ModelConfig(
        vocab_size=70,
        d_model=48,
        n_layers=2,
        n_heads=6,
        ffn_hidden=64,
        max_seq_len=64,
        attention="dense",
    ),
    "gqa": ModelConfig(
        vocab_size=50,
        d_model=32,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        ffn_hidden=48,
        max_seq_len=64,
        local_window=8,
        global_k=4,
        block_size=8,
    ),
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _expected_parameters(c: ModelConfig) -> int:
    d, h, kv, hd, f = c.d_model, c.n_heads, c.kv_heads, c.head_dim, c.ffn_hidden
    gate = d * h + h if c.attention == "mla" and c.mix == "gate" else 0
    per_layer = 2 * d + d * h * hd + 2 * d * kv * hd + h * hd * d + gate + 3 * d * f
    return c.vocab_size * d + c.n_layers * per_layer + d


def _model(name: str, seed: int = 0) -> MLATransformer:
    torch.manual_seed(seed)
    return MLATransformer(CONFIGS[name])


@pytest.mark.parametrize("name", CONFIGS)
def test_parameter_count_matches_formula(name):
    model = _model(name)
    assert sum(p.numel() for p in model.parameters()) == _expected_parameters(CONFIGS[name])


@pytest.mark.parametrize("name", CONFIGS)
def test_logits_shape(name):
    tokens = torch.randint(0, CONFIGS[name].vocab_size, (2, 19))
    assert _model(name)(tokens).shape == (2, 19, CONFIGS[name].vocab_size)


def test_output_head_is_tied_to_the_embedding():
    model = _model("mla-gate")
    shapes = [tuple(p.shape) for p in model.parameters()]
    assert shapes.count((50, 32)) == 1  # only tok_emb.weight: no separate head matrix
    tokens = torch.randint(0, 3, (2, 9))  # embedding row 10 is never looked up...
    model(tokens)[..., 10].sum().backward()
    assert model.tok_emb.weight.grad[10].abs().sum() > 0  # ...yet it gets the head's gradient


def test_init_is_deterministic_and_scaled():
    a, b, c = _model("mla-sum", 5), _model("mla-sum", 5), _model("mla-sum", 6)
    assert all(
        torch.equal(x, y)
        for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=False)
    )
    assert not torch.equal(a.tok_emb.weight, c.tok_emb.weight)
    big = ModelConfig(d_model=256, n_layers=8, n_heads=4, ffn_hidden=512)
    torch.manual_seed(0)
    model = MLATransformer(big)
    scaled = 0.02 / math.sqrt(2 * big.n_layers)
    assert model.blocks[0].attn.wq.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.blocks[0].attn.wo.weight.std().item() == pytest.approx(scaled, rel=0.05)
    assert model.blocks[0].mlp.w2.weight.std().item() == pytest.approx(scaled, rel=0.05)


def test_block_is_usable_alone():
    block = TransformerBlock(CONFIGS["gqa"], layer_idx=1)
    x = torch.randn(2, 17, 32)
    assert block(x).shape == x.shape


@pytest.mark.parametrize("name", ["mla-gate", "mla-sum", "dense", "gqa"])
def test_loss_decreases_when_overfitting_one_batch(name):
    model = _model(name)
    tokens = torch.randint(
        0, CONFIGS[name].vocab_size, (4, 33), generator=torch.Generator().manual_seed(0)
    )
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize("name", ["mla-gate", "mla-sum", "dense", "gqa"])
def test_model_is_causal(name):
    model = _model(name).double()
    tokens = torch.randint(0, 50, (2, 40), generator=torch.Generator().manual_seed(1))
    changed = tokens.clone()
    changed[:, 25:] = (changed[:, 25:] + 7) % 50
    a, b = model(tokens), model(changed)
    assert torch.equal(a[:, :25], b[:, :25])
    assert not torch.allclose(a[:, 25], b[:, 25])


def test_recompute_gives_the_same_gradients():
    tokens = torch.randint(0, 50, (2, 20), generator=torch.Generator().manual_seed(2))
    grads = []
    for recompute in (False, True):
        model = _model("mla-gate")
        model.recompute = recompute
        model(tokens).square().mean().backward()
        grads.append([p.grad for p in model.parameters()])
    for g0, g1 in zip(*grads, strict=False):
        torch.testing.assert_close(g0, g1)
