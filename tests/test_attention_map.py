"""The effective attention matrix (:mod:`mla.attention_map`) is the layer's real mixing: A @ v
equals the attention core's output, rows sum to 1, and no weight lies outside the local band and
the global branch's keys."""

from __future__ import annotations

import pytest
import torch

from mla.attention import multi_level_attention
from mla.attention_map import effective_attention
from mla.config import ModelConfig
from mla.model import MLATransformer


@pytest.mark.parametrize("indexer", ["block", "exact"])
def test_weights_times_values_is_the_layers_attention_output(indexer, one_torch_thread):
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=64,
        d_model=32,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        ffn_hidden=64,
        local_window=4,
        global_k=8,
        block_size=4,
        indexer=indexer,
    )
    model = MLATransformer(cfg).eval()
    tokens = torch.randint(0, 64, (24,))
    amap = effective_attention(model, tokens, layer=1)
    attn = model.blocks[1].attn
    captured = {}
    handle = attn.register_forward_pre_hook(lambda m, a: captured.setdefault("x", a[0]))
    with torch.no_grad():
        model(tokens.view(1, -1))
        handle.remove()
        q, k, v = attn._project(captured["x"])
        expected = multi_level_attention(
            q, k, v, attn._gate(captured["x"]), window=4, top_k=8, indexer=indexer, block=4
        )
    v_rep = v.repeat_interleave(2, dim=1)[0]
    torch.testing.assert_close(amap.weights @ v_rep, expected[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(amap.weights.sum(-1), torch.ones(4, 24))
    allowed = amap.local_mask | amap.global_mask
    assert float(amap.weights[~allowed].abs().max()) == 0.0
    assert amap.gate.shape == (4, 24) and bool(((amap.gate > 0) & (amap.gate < 1)).all())


def test_window_only_model_maps_the_local_branch_alone(one_torch_thread):
    cfg = ModelConfig(
        vocab_size=64,
        d_model=32,
        n_layers=1,
        n_heads=2,
        ffn_hidden=64,
        local_window=4,
        global_k=4,
        block_size=4,
        mix="local",
    )
    amap = effective_attention(MLATransformer(cfg).eval(), torch.randint(0, 64, (12,)), 0)
    torch.testing.assert_close(amap.weights.sum(-1), torch.ones(2, 12))
    assert float(amap.weights[:, ~amap.local_mask].abs().max()) == 0.0


def test_dense_model_and_bad_layer_are_refused():
    dense = MLATransformer(
        ModelConfig(
            vocab_size=64, d_model=32, n_layers=1, n_heads=2, ffn_hidden=64, attention="dense"
        )
    )
    with pytest.raises(ValueError, match="needs an MLA model"):
        effective_attention(dense, torch.zeros(8, dtype=torch.long), 0)
    mla = MLATransformer(
        ModelConfig(
            vocab_size=64,
            d_model=32,
            n_layers=1,
            n_heads=2,
            ffn_hidden=64,
            local_window=4,
            global_k=4,
            block_size=4,
        )
    )
    with pytest.raises(ValueError, match="layer=3 outside 0..0"):
        effective_attention(mla, torch.zeros(8, dtype=torch.long), 3)


def test_the_worker_probe_gives_the_map_of_the_first_window_prefix(one_torch_thread):
    from workers.attention_probe import AttentionProbe

    torch.manual_seed(1)
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
    batch = torch.randint(0, 64, (2, 30))  # 30 tokens: the probe keeps 28 (a multiple of B = 4)
    with AttentionProbe(model, cfg) as probe, torch.no_grad():
        model(batch)
        model(torch.randint(0, 64, (2, 30)))  # later forwards of the pass are ignored
    maps = probe.maps()
    assert sorted(maps) == [0, 2]  # first and last block
    expected = effective_attention(model, batch[0, :28], layer=2)
    torch.testing.assert_close(maps[2].weights, expected.weights)
