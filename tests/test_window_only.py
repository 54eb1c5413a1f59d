"""The window-only switch (``mix="local"``): the global branch off, nothing else changed."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from mla.attention import MultiLevelAttention
from mla.config import ModelConfig
from mla.local_attention import local_attention
from mla.model import MLATransformer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

BASE: dict[str, Any] = dict(
    vocab_size=40,
    d_model=32,
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,
    ffn_hidden=48,
    max_seq_len=96,
    local_window=6,
    global_k=8,
    block_size=8,
)


def _pair(seed: int = 0) -> tuple[MLATransformer, MLATransformer]:
    """A gated MLA model and the window-only model holding the same weights."""
    torch.manual_seed(seed)
    mla = MLATransformer(ModelConfig(**BASE)).double()
    window = MLATransformer(ModelConfig(**BASE, mix="local")).double()
    missing, unexpected = window.load_state_dict(mla.state_dict(), strict=False)
    assert not missing and all(".w_gate." in name for name in unexpected)
    return mla, window


def test_window_only_has_no_gate_parameters_and_equals_the_local_branch():
    layer = MultiLevelAttention(ModelConfig(**BASE, mix="local")).double()
    assert layer.w_gate is None
    x = torch.randn(2, 37, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    q, k, v = layer._project(x)
    o = local_attention(q, k, v, BASE["local_window"], BASE["block_size"])
    expected = layer.wo(o.transpose(1, 2).reshape(2, 37, -1))
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=0)


def test_mla_with_its_gate_saturated_on_the_local_branch_equals_window_only():
    """The switch changes the output only through the global branch: with the gate forced to
    weight the local branch by exactly 1, the MLA model and the window-only model agree."""
    mla, window = _pair()
    tokens = torch.randint(0, 40, (2, 90), generator=torch.Generator().manual_seed(1))
    assert not torch.allclose(mla(tokens), window(tokens))  # the global branch matters ...
    for block in mla.blocks:
        torch.nn.init.zeros_(block.attn.w_gate.weight)
        torch.nn.init.constant_(block.attn.w_gate.bias, 60.0)  # sigmoid(60) == 1.0 in fp64
    torch.testing.assert_close(mla(tokens), window(tokens), rtol=0, atol=0)  # ... and only it


def test_window_only_cannot_see_past_its_receptive_field_but_mla_can():
    """Changing token 0 moves no window-only logit at positions >= n_layers * (w - 1) + 1 (the
    stacked windows' reach), while MLA's global branch carries it further."""
    mla, window = _pair(seed=3)
    reach = BASE["n_layers"] * (BASE["local_window"] - 1)
    tokens = torch.randint(1, 40, (1, 90), generator=torch.Generator().manual_seed(2))
    changed = tokens.clone()
    changed[0, 0] = 0
    for model, blind in ((window, True), (mla, False)):
        a, b = model(tokens)[0, reach + 1 :], model(changed)[0, reach + 1 :]
        assert torch.equal(a, b) is blind
    w_a, w_b = window(tokens)[0, reach], window(changed)[0, reach]
    assert not torch.equal(w_a, w_b)  # the edge of the reach still sees it


def test_window_only_counts_only_window_flops_and_is_named_in_the_config_error():
    from mla.flops import attended_keys

    cfg = ModelConfig(**BASE, mix="local")
    assert attended_keys(cfg, 90) == BASE["local_window"]
    assert attended_keys(ModelConfig(**BASE), 90) > BASE["local_window"]
    with pytest.raises(ValueError, match="mix='window'.*'local'"):
        ModelConfig(**BASE, mix="window")
