"""`mla compress` with hidden-channel and depth pruning (in process): forced shapes are checked
against the model before any work with the option's name; the search grid gains hidden/depth
shapes only when asked; a forced hidden + layer shape deploys a smaller file whose size the
prediction gives and whose reload reproduces the report's reference logits."""

import json

import pytest
import torch
from rich.console import Console

from mla.compress.onnx_export import OnnxLM
from mla.config import ModelConfig
from mla.pretrained import load_pretrained
from orchestrator.contract.errors import ConfigError
from tests.compress_fixture import SHAPE, train_tiny
from workers.compress import (
    CompressSettings,
    candidate_shapes,
    check_against_model,
    check_settings,
    compress,
    floor_bytes,
)

CFG = ModelConfig(**{**SHAPE, "attention": "dense"})  # d 32, 2 layers, kv 2


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"hidden_keep": 0}, "--hidden-keep=0 must be in [1, d_model=32] (pruning every hidden"),
        ({"hidden_keep": 33}, "--hidden-keep=33 must be in [1, d_model=32]"),
        ({"layers_keep": 0}, "--layers-keep=0 must be in [1, n_layers=2] (pruning every layer"),
        ({"layers_keep": 3}, "--layers-keep=3 must be in [1, n_layers=2]"),
    ],
)
def test_forced_hidden_and_layer_shapes_are_refused_before_any_work(kw, message):
    s = CompressSettings(**kw)
    check_settings(s)  # a forced shape is something to fit
    with pytest.raises(ConfigError) as err:
        check_against_model(s, CFG, 64)
    assert message in str(err.value)


def test_the_size_floor_follows_the_smallest_hidden_width_the_run_keeps():
    full = floor_bytes(CFG, "int8")
    assert floor_bytes(CFG, "int8", 16, 1) == 256 * 16 + 4 * 16 * 3 < full
    s = CompressSettings(target_mb=full / 1e6 * 0.9)
    with pytest.raises(ConfigError, match="below what this model takes"):
        check_against_model(s, CFG, 64)
    check_against_model(
        CompressSettings(target_mb=full / 1e6 * 0.9, search_hidden_layers=True), CFG, 64
    )


def test_search_grid_adds_hidden_and_depth_shapes_only_when_asked():
    plain = candidate_shapes(CFG, 1)
    more = candidate_shapes(CFG, 1, hidden_layers=True)
    assert all(h == 32 and n == 2 for _, _, h, n in plain)
    assert {(h, n) for _, _, h, n in more} == {(32, 2), (24, 2), (32, 1)}
    assert len(more) == 3 * len(plain)


@pytest.fixture(scope="module")
def compressed(tmp_path_factory):
    pytest.importorskip("onnxruntime")
    torch.set_num_threads(1)
    teacher = train_tiny(steps=30, attention="dense", d_model=64, ffn_hidden=128, n_layers=3)
    s = CompressSettings(
        hidden_keep=40,
        layers_keep=2,
        ffn_keep=96,
        steps=3,
        calib_windows=8,
        val_windows=8,
        candidates=1,
    )
    check_settings(s)
    check_against_model(s, teacher.cfg, 64)
    out = tmp_path_factory.mktemp("prune-pipeline") / "out"
    report = compress(teacher, None, s, out, "teacher", Console(stderr=True, quiet=True))
    return report, out


@pytest.mark.slow  # the module fixture trains, exports and quantises twice: ~30 s
def test_forced_hidden_and_layer_shape_deploys_a_smaller_file(compressed):
    report, out = compressed
    d = report["deployed"]
    assert (d["ffn_keep"], d["groups_keep"], d["hidden_keep"], d["layers_keep"]) == (96, 2, 40, 2)
    size = (out / "model.int8.onnx").stat().st_size
    assert size / 1e6 == pytest.approx(d["size_mb"])
    assert size / 1e6 < 0.75 * report["teacher_onnx_int8"]["size_mb"]
    assert d["predicted_mb"] == pytest.approx(size / 1e6, rel=0.03)  # the size formula holds
    pruned = load_pretrained(out / "pruned")
    assert (pruned.cfg.d_model, pruned.cfg.n_layers, pruned.cfg.head_dim) == (40, 2, 16)
    assert json.loads((out / "compress_report.json").read_text()) == json.loads(json.dumps(report))


@pytest.mark.slow
def test_forced_hidden_and_layer_shape_reloads_with_the_reference_logits(compressed):
    report, out = compressed
    ref = report["reference"]
    tokens = torch.tensor([ref["tokens"]])
    pruned = load_pretrained(out / "pruned")
    with torch.no_grad():
        got = pruned(tokens)[0, -1]
    assert torch.equal(got, torch.tensor(ref["torch_logits_last"], dtype=torch.float32))
    onnx = OnnxLM(out / "model.int8.onnx")
    want = torch.tensor(ref["onnx_logits_last"], dtype=torch.float32)
    assert torch.equal(torch.from_numpy(onnx(tokens.numpy())[0, -1]), want)


@pytest.mark.slow  # two ONNX exports + INT8 quantisation, ~60 masked evaluations: ~30 s
def test_search_ranks_hidden_and_depth_shapes_by_masked_loss(tmp_path):
    pytest.importorskip("onnxruntime")
    torch.set_num_threads(1)
    teacher = train_tiny(steps=30, attention="dense", d_model=64, ffn_hidden=128, n_layers=3)
    s = CompressSettings(
        target_mb=10.0, search_hidden_layers=True, steps=0, calib_windows=8, val_windows=8
    )
    check_settings(s)
    report = compress(teacher, None, s, tmp_path / "out", "t", Console(stderr=True, quiet=True))
    ranked = report["candidates_within_budget"]
    assert (
        report["candidates_considered"] == len(ranked) == 3 * len(candidate_shapes(teacher.cfg, 1))
    )
    assert {(c["hidden_keep"], c["layers_keep"]) for c in ranked} == {(64, 3), (48, 3), (64, 2)}
    losses = [c["masked_val_loss"] for c in ranked]
    assert losses == sorted(losses)
    unpruned = next(c for c in ranked if c["params"] == report["teacher"]["params"])
    assert unpruned["masked_val_loss"] == pytest.approx(report["teacher"]["val_loss"], abs=1e-5)
    best = ranked[0]  # with --steps 0 the lowest masked loss is deployed as is
    shape = ("ffn_keep", "groups_keep", "hidden_keep", "layers_keep")
    assert [report["deployed"][k] for k in shape] == [best[k] for k in shape]
    assert report["deployed"]["torch_val_loss"] == pytest.approx(best["masked_val_loss"], abs=1e-5)
