"""``mla viz attention``: the heat map shows exactly the effective attention of the chosen head
(read back from the figure), the PNG decodes and is not blank, bad options are clear errors."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from mla.attention_map import effective_attention
from mla.config import ModelConfig
from mla.model import MLATransformer
from mla.pretrained import save_pretrained
from orchestrator.viz_attention import attention_figure


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=256,
        d_model=32,
        n_layers=2,
        n_heads=2,
        ffn_hidden=64,
        local_window=8,
        global_k=8,
        block_size=8,
        max_seq_len=64,
    )
    return save_pretrained(MLATransformer(cfg).eval(), tmp_path_factory.mktemp("export") / "tiny")


def test_figure_shows_the_heads_effective_attention(export_dir, one_torch_thread):
    from mla.pretrained import load_pretrained

    model = load_pretrained(export_dir)
    tokens = torch.tensor(list(b"import os\nprint(os.getcwd())\n"))
    amap = effective_attention(model, tokens, layer=1)
    fig = attention_figure(amap, head=1, labels=[chr(t) for t in tokens.tolist()])
    heat = fig.axes[0].images[0].get_array()
    np.testing.assert_array_equal(np.asarray(heat), amap.weights[1].numpy())
    assert len(fig.axes[0].get_xticklabels()) == len(tokens)  # short text: bytes as labels


def test_cli_writes_a_png_that_is_not_blank(export_dir, tmp_path, mla_cli):
    from matplotlib.image import imread

    out = tmp_path / "attn.png"
    got = mla_cli(
        "viz", "attention", str(export_dir), "--layer", "1", "--head", "0", "-o", str(out)
    )
    assert got.returncode == 0, got.stderr
    pixels = imread(out)
    assert pixels.shape[:2] == (600, 700) and np.std(pixels[..., :3]) > 0.05


@pytest.mark.parametrize(
    ("layer", "head", "text", "message"),
    [
        (5, 0, None, "--layer=5 is outside 0..1"),
        (0, 2, None, "--head=2 is outside 0..1"),
        (0, 0, "", "--text has 0 bytes"),
        (0, 0, "x" * 65, "--text has 65 bytes; give 1..64"),
    ],
)
def test_bad_options_are_clear_errors(export_dir, tmp_path, layer, head, text, message):
    from orchestrator.contract.errors import ConfigError
    from orchestrator.viz_attention import plot_attention

    with pytest.raises(ConfigError, match=re.escape(message)):
        plot_attention(str(export_dir), layer, head, text, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_a_bad_option_exits_2_without_a_traceback(export_dir, tmp_path, mla_cli):
    got = mla_cli(
        "viz", "attention", str(export_dir), "--layer", "5", "-o", str(tmp_path / "x.png")
    )
    assert got.returncode == 2 and "--layer=5 is outside 0..1" in got.stderr
    assert "Traceback" not in got.stderr


def test_gates_figure_shows_each_layer_and_heads_mean_gate(export_dir, tmp_path, mla_cli):
    from mla.pretrained import load_pretrained
    from orchestrator.viz_attention import PROBE_TEXT, gates_figure
    from workers.gate_probe import GateProbe

    model = load_pretrained(export_dir)
    with GateProbe(model) as probe, torch.no_grad():
        model(torch.tensor(list(PROBE_TEXT.encode())[:64]).view(1, -1))
    heat = np.asarray(gates_figure(probe.head_means()).axes[0].images[0].get_array())
    assert heat.shape == (2, 2)
    np.testing.assert_allclose(heat, [probe.head_means()[0], probe.head_means()[1]])
    got = mla_cli("viz", "gates", str(export_dir), "-o", str(tmp_path / "g.png"))
    assert got.returncode == 0, got.stderr
    from matplotlib.image import imread

    assert np.std(imread(tmp_path / "g.png")[..., :3]) > 0.05
