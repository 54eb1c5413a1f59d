"""ONNX export + ONNX Runtime INT8 of a trained tiny MLA model: parity, size, loss, atomicity."""

import pytest
import torch
import torch.nn.functional as F

from mla.compress.onnx_export import OnnxLM, export_onnx, onnx_size_bytes, quantize_int8
from tests.compress_fixture import train_tiny, val_batch

# ONNX export and ONNX Runtime sessions take minutes on a loaded 2-core machine.
pytestmark = pytest.mark.slow

pytest.importorskip("onnxruntime")

#: ORT fp32 vs torch fp32 logits, max absolute difference (logits of a trained model are O(10)).
FP32_ATOL = 1e-3


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.set_num_threads(1)
    model = train_tiny()
    folder = tmp_path_factory.mktemp("onnx")
    fp32 = export_onnx(model, folder / "model.onnx")
    int8 = quantize_int8(fp32, folder / "model.int8.onnx")
    return model, folder, fp32, int8


def _loss(logits, y) -> float:
    return float(F.cross_entropy(torch.as_tensor(logits).flatten(0, 1), y.flatten()))


def test_onnx_fp32_matches_torch_on_a_trained_model(exported):
    model, _, fp32, _ = exported
    x, _ = val_batch(4)
    with torch.no_grad():
        want = model(x).numpy()
    got = OnnxLM(fp32)(x)
    assert got.shape == want.shape
    assert abs(got - want).max() < FP32_ATOL


def test_onnx_takes_any_batch_size_and_refuses_another_length(exported):
    model, _, fp32, _ = exported
    x, _ = val_batch(3)
    with torch.no_grad():
        want = model(x[:1]).numpy()
    lm = OnnxLM(fp32)
    assert abs(lm(x[:1]) - want).max() < FP32_ATOL
    assert lm(x).shape == (3, 64, 256)
    with pytest.raises(ValueError, match="takes \\(batch, 64\\) token windows"):
        lm(x[:, :40])


def test_int8_is_smaller_and_keeps_the_loss(exported):
    model, _, fp32, int8 = exported
    x, y = val_batch(8)
    with torch.no_grad():
        torch_loss = _loss(model(x), y)
    int8_loss = _loss(OnnxLM(int8)(x), y)
    assert onnx_size_bytes(int8) < 0.8 * onnx_size_bytes(fp32)  # tiny: graph constants weigh
    assert abs(int8_loss - torch_loss) < 0.02 * torch_loss


def test_config_travels_in_the_file_and_no_temporary_is_left(exported):
    model, folder, fp32, int8 = exported
    assert OnnxLM.read_config(fp32) == model.cfg == OnnxLM.read_config(int8)
    assert sorted(p.name for p in folder.iterdir()) == ["model.int8.onnx", "model.onnx"]


def test_a_file_that_is_not_an_mla_export_is_refused(tmp_path):
    bad = tmp_path / "x.onnx"
    bad.write_bytes(b"not onnx at all")
    with pytest.raises(ValueError, match="not an ONNX model"):
        OnnxLM.read_config(bad)
    with pytest.raises(FileNotFoundError):
        OnnxLM.read_config(tmp_path / "missing.onnx")


def test_greedy_onnx_generation_matches_the_torch_kv_cache_decoder(exported):
    from mla.compress.onnx_generate import generate_onnx
    from mla.generate import generate
    from mla.sampling import SamplingConfig

    model, _, fp32, _ = exported
    greedy = SamplingConfig(temperature=0.0)
    prompts = [list(b"def main():\n    "), list(b"import ")]
    want = generate(model, prompts, 20, greedy)
    lm = OnnxLM(fp32)
    got = generate_onnx(lm, lm.seq_len, prompts, 20, greedy)
    assert got == want and len(got[0]) == 20
    # a row stops where the window ends: 64 - 60 + 1 new tokens
    assert len(generate_onnx(lm, lm.seq_len, [[65] * 60], 20, greedy)[0]) == 5


def test_the_deployed_file_holds_no_debug_metadata_and_no_duplicate_initializer(exported):
    import onnx

    _, _, fp32, int8 = exported
    for path in (fp32, int8):
        raw = path.read_bytes()
        assert b"stack_trace" not in raw and b"fx_node" not in raw  # nor this host's paths
        graph = onnx.load(str(path)).graph
        assert not any(n.metadata_props or n.doc_string for n in graph.node)
        arrays = [onnx.numpy_helper.to_array(t) for t in graph.initializer]
        big = [(a.dtype.str, a.shape, a.tobytes()) for a in arrays if a.size >= 256]
        assert len(big) == len(set(big))  # the per-layer rotary tables are stored once


def test_exporting_before_the_first_eager_forward_leaves_eager_outputs_right(tmp_path):
    """Masks built while the exporter traces must not be cached for eager calls (they were, and
    the model's own logits came out wrong after an export)."""
    from mla.global_attention import _selection_bias_cached
    from mla.local_attention import _band_bias_cached, _band_mask_cached

    caches = (_band_mask_cached, _band_bias_cached, _selection_bias_cached)
    for cache in caches:
        cache.cache_clear()
    model = train_tiny(steps=0, max_seq_len=48)  # a length no other test uses
    x, _ = val_batch(2)
    x = x[:, :48]
    export_onnx(model, tmp_path / "m.onnx", 48)
    assert all(c.cache_info().currsize == 0 for c in caches)
    with torch.no_grad():
        after_export = model(x)
        for cache in caches:
            cache.cache_clear()
        clean = model(x)
    assert torch.equal(after_export, clean)
