"""INT8 quantisation-aware training with torchao: prepare simulates INT8, convert leaves an
ordinary model whose weights load into a plain MLATransformer and export to ONNX."""

import copy

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("torchao")

from mla.compress.qat import convert_qat, fake_quant_modules, prepare_qat, qat_distill  # noqa: E402
from mla.model import MLATransformer  # noqa: E402
from tests.compress_fixture import corpus_windows, train_tiny, val_batch  # noqa: E402


@pytest.fixture(scope="module")
def trained():
    torch.set_num_threads(1)
    return train_tiny(steps=60, attention="dense")


def _batches():
    train, _ = corpus_windows(64)
    for i in range(10_000):
        yield tuple(torch.from_numpy(a) for a in train.windows(np.arange(i * 4, i * 4 + 4)))


def _linears(model: nn.Module) -> int:
    return sum(isinstance(m, nn.Linear) for m in model.modules())


def test_prepare_fake_quantises_every_linear_and_changes_the_numerics(trained):
    model = copy.deepcopy(trained)
    x, _ = val_batch(2)
    prepare_qat(model)
    fq = [n for n in fake_quant_modules(model) if n.endswith(("wq", "w1", "wo", "w2"))]
    assert len(fq) == 4 * trained.cfg.n_layers  # the layers themselves (plus their quantisers)
    with torch.no_grad():
        diff = (model.eval()(x) - trained(x)).abs().max()
    assert 0 < diff < 1.0  # INT8 rounding: visible, small
    with pytest.raises(ValueError, match="called twice"):
        prepare_qat(model)


def test_qat_round_trip_leaves_plain_modules_that_load_into_a_plain_model(trained):
    student = copy.deepcopy(trained)
    losses = qat_distill(student, trained, _batches(), steps=5, lr=1e-3)
    assert len(losses) == 5 and not student.training
    assert fake_quant_modules(student) == []
    assert {type(m) for m in student.modules() if isinstance(m, nn.Linear)} == {nn.Linear}
    assert _linears(student) == _linears(trained)
    plain = MLATransformer(trained.cfg).eval()
    plain.load_state_dict(student.state_dict(), strict=True)
    x, _ = val_batch(2)
    with torch.no_grad():
        assert torch.equal(plain(x), student(x))
        assert not torch.equal(student(x), trained(x))  # QAT steps did train


def test_convert_without_training_gives_back_the_same_function(trained):
    model = convert_qat(prepare_qat(copy.deepcopy(trained)))
    x, _ = val_batch(2)
    with torch.no_grad():
        assert torch.equal(model(x), trained(x))


@pytest.mark.slow
def test_converted_model_exports_and_onnx_runtime_int8_agrees(trained, tmp_path):
    pytest.importorskip("onnxruntime")
    import torch.nn.functional as F

    from mla.compress.onnx_export import OnnxLM, export_onnx, quantize_int8

    student = copy.deepcopy(trained)
    qat_distill(student, trained, _batches(), steps=3, lr=1e-4)
    int8 = quantize_int8(export_onnx(student, tmp_path / "m.onnx"), tmp_path / "m.int8.onnx")
    x, y = val_batch(4)
    with torch.no_grad():
        want = float(F.cross_entropy(student(x).flatten(0, 1), y.flatten()))
    got = float(F.cross_entropy(torch.from_numpy(OnnxLM(int8)(x)).flatten(0, 1), y.flatten()))
    assert abs(got - want) < 0.02 * want
