"""INT8 quantisation-aware training (QAT) with torchao fake quantisation, converted back to plain
modules.

:func:`prepare_qat` swaps every ``nn.Linear`` of the model for torchao's ``FakeQuantizedLinear``
(``torchao.quantization.qat.QATConfig(step="prepare")``, torchao 0.18): in the forward pass its
input is quantised and dequantised to INT8 per token, asymmetric, and its weight to INT8 per
output channel, symmetric (``IntxFakeQuantizeConfig``); gradients pass the rounding straight
through (Bengio et al. 2013, straight-through estimator; Jacob et al. 2018, "Quantization and
Training of Neural Networks for Efficient Integer-Arithmetic-Only Inference", Sec. 3). Training
under these numerics teaches the weights to tolerate the rounding of the INT8 deployment.
:func:`convert_qat` (``QATConfig(step="convert")`` without a base config) removes the fake
quantisers again and leaves ordinary ``nn.Linear`` modules holding the trained fp32 weights, so
the model is a plain :class:`mla.MLATransformer` that saves, reloads and exports like any other;
the deployment then quantises it with ONNX Runtime (:func:`mla.compress.onnx_export.quantize_int8`:
per-channel INT8 weights like the fake quantiser, activations per tensor at run time).

Why not torchao's INT8 kernels: on this project's CPUs (AVX2, no VNNI) they are 10-23x slower
than fp32 (``../shared/anchors/compression/REPORT.md``, Sec. 3a), so torchao supplies the
training-time numerics only. The embedding and the tied output head (``F.linear`` with the
embedding weight, not an ``nn.Linear``) are not fake-quantised; ONNX Runtime's dynamic INT8 does
quantise the head's MatMul, a small mismatch the REPORT measured as invisible at this scale
(ORT INT8 loss = fake-quant loss +- 0.0002, Sec. 3d).

Needs ``torchao`` (the ``compress`` extra), imported inside the functions.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Callable, Iterator

import torch
from torch import nn

from mla.compress.distill import distill
from mla.model import MLATransformer


@contextlib.contextmanager
def _quiet_import() -> Iterator[None]:
    """torchao logs "Failed to load ... _C_cutlass_90a / _C_mxfp8" (CUDA kernels absent on a CPU
    build) and pytree deprecation warnings at import; none concerns QAT on the CPU."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(previous)


def _qat_config(step: str):
    with _quiet_import():
        from torchao.quantization.qat import IntxFakeQuantizeConfig, QATConfig
    if step == "convert":
        return QATConfig(step="convert")
    act = IntxFakeQuantizeConfig(torch.int8, "per_token", is_symmetric=False)
    weight = IntxFakeQuantizeConfig(torch.int8, "per_channel", is_symmetric=True)
    return QATConfig(activation_config=act, weight_config=weight, step="prepare")


def fake_quant_modules(model: nn.Module) -> list[str]:
    """Names of the modules of ``model`` that come from torchao's QAT (fake quantisers and
    fake-quantised layers); empty for a plain model."""
    return [
        name
        for name, m in model.named_modules()
        if type(m).__module__.startswith("torchao.") and "FakeQuant" in type(m).__name__
    ]


def prepare_qat(model: MLATransformer) -> MLATransformer:
    """Insert INT8 fake quantisation into every ``nn.Linear`` of ``model``, in place.

    Args:
        model: A plain model (no fake quantisers yet).

    Returns:
        ``model``, whose Linear layers now simulate INT8 (per-token asymmetric activations,
        per-channel symmetric weights) in the forward pass; parameters keep their names, so an
        optimiser must be built after this call.

    Raises:
        ValueError: ``model`` is already prepared.
    """
    if fake_quant_modules(model):
        raise ValueError("model already holds fake quantisers: prepare_qat was called twice")
    config = _qat_config("prepare")
    with _quiet_import():  # torchao imports modules lazily: keep their log lines out
        from torchao.quantization import quantize_

        quantize_(model, config)
    return model


def convert_qat(model: MLATransformer) -> MLATransformer:
    """Remove the fake quantisers of a :func:`prepare_qat` model, in place.

    Returns:
        ``model`` with plain ``nn.Linear`` modules holding the QAT-trained fp32 weights; its
        ``state_dict`` has the keys of an unprepared :class:`MLATransformer` of the same config.

    Raises:
        RuntimeError: a fake-quantised module survived the conversion (a torchao change).
    """
    config = _qat_config("convert")
    with _quiet_import():  # torchao imports modules lazily: keep their log lines out
        from torchao.quantization import quantize_

        quantize_(model, config)
    left = fake_quant_modules(model)
    if left:
        raise RuntimeError(f"torchao QAT convert left fake-quantised modules: {left[:3]}")
    return model


def qat_distill(
    student: MLATransformer,
    teacher: MLATransformer,
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
    steps: int,
    lr: float = 3e-4,
    progress: Callable[[int, float], None] | None = None,
) -> list[float]:
    """``steps`` of logit distillation (:func:`mla.compress.distill.distill`) under INT8 fake
    quantisation: prepare, train, convert. ``student`` ends as a plain model (eval mode).

    Args:
        student: The model to fine-tune, in place.
        teacher: The frozen teacher whose logits the student matches.
        batches: Yields ``(inputs, targets)`` ``(batch, seq)`` int64 pairs.
        steps: Optimiser steps (0: prepare and convert only, weights unchanged).
        lr: Peak learning rate (lower than recovery's: the last part of training).
        progress: Optional ``callable(step, loss)``.

    Returns:
        The KD loss of every step (nats per token).
    """
    prepare_qat(student)
    try:
        losses = distill(student, teacher, batches, steps, lr, progress=progress)
    finally:
        convert_qat(student)
    return losses
