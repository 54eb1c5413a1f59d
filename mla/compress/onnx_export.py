"""ONNX export, ONNX Runtime dynamic INT8 and an ONNX Runtime language model.

The deployed CPU artefact is the model exported with ``torch.onnx.export(dynamo=True)`` (full
sequence forward: ``tokens (batch, seq) int64 -> logits (batch, seq, vocab) float32``; the
batch is dynamic, the sequence length is fixed at export: the blocked attention's chunking
specialises the traced graph to one length) and quantised with ONNX Runtime's post-training dynamic quantisation
(``quantize_dynamic``: INT8 per-output-channel weights, activations quantised per tensor at run
time; MatMul weights only, so the embedding and norms stay fp32). On this project's CPUs
(AVX2, no VNNI) that path is 2.2x faster than torch fp32 at batch 1 while torchao's INT8 kernels
are 10-23x slower (``../shared/anchors/compression/REPORT.md``, Sec. 3a).

The exported graph is slimmed before it is written (:func:`_slim`): no per-node debug metadata
(stack traces, FX nodes) and one copy of each repeated initializer (the rotary tables). On the
``tiny`` preset that took the INT8 file from 1.67 to 1.05 MB and the fp32 one from 4.17 to 3.52
MB (3.36 MB of weights), with outputs unchanged (measured equal).

Every file is written under a temporary name in its destination folder and renamed when
complete, so a file named ``model.onnx`` is always whole. The model's config travels inside the
file (ONNX ``metadata_props`` key ``mla.model``), so :class:`OnnxLM` needs nothing else.

Needs the ``compress`` extra (``onnx``, ``onnxruntime``, ``onnxscript``), imported inside the
functions.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from mla.config import ModelConfig
from mla.model import MLATransformer

#: ONNX metadata key holding the model config as JSON.
META_KEY = "mla.model"


def onnx_size_bytes(path: str | os.PathLike) -> int:
    """Size on disk of an ONNX model, counting an external-data file ``PATH.data`` if present."""
    p = Path(path)
    data = p.with_name(p.name + ".data")
    return p.stat().st_size + (data.stat().st_size if data.exists() else 0)


def export_onnx(model: MLATransformer, path: str | os.PathLike, seq_len: int = 0) -> Path:
    """Export the full-sequence forward of ``model`` to one ONNX file, atomically.

    Args:
        model: The model (exported in eval mode; fp32).
        path: Destination ``.onnx`` file (replaced if it exists).
        seq_len: Sequence length the graph takes (default ``max_seq_len``); any batch size.

    Returns:
        ``path`` as a ``Path``.
    """
    from torch.export import Dim

    cfg = model.cfg
    seq = seq_len or cfg.max_seq_len
    x = torch.zeros(2, seq, dtype=torch.long)
    dims = {"tokens": {0: Dim("batch", max=4096)}}
    model = model.float().eval()

    def write(tmp: Path) -> None:
        with _quiet(), torch.no_grad():
            torch.onnx.export(
                model,
                (x,),
                str(tmp),
                dynamo=True,
                external_data=False,
                input_names=["tokens"],
                output_names=["logits"],
                dynamic_shapes=dims,
                verbose=False,
            )
        _slim(tmp, cfg)

    return _atomic(Path(path), write)


def _slim(path: Path, cfg: ModelConfig) -> None:
    """Drop what the deployed file does not need, with onnx_ir's standard passes.

    The dynamo exporter records on every node its Python stack trace, FX node and module path
    (``pkg.torch.onnx.*`` metadata: a third of the INT8 tiny model's file, and this machine's
    paths), and it writes each layer's copy of the rotary tables as its own initializer.
    ``ClearMetadataAndDocStringPass`` removes the former, ``DeduplicateInitializersPass`` makes
    identical initializers (same dtype, shape and bytes) one. Neither changes what is computed.
    The model's config is written as the only model-level metadata in the same save.
    """
    import onnx_ir as ir
    from onnx_ir.passes.common import ClearMetadataAndDocStringPass, DeduplicateInitializersPass

    model = ir.load(str(path))
    for step in (ClearMetadataAndDocStringPass(), DeduplicateInitializersPass(size_limit=1 << 22)):
        model = step(model).model
    model.metadata_props[META_KEY] = json.dumps(cfg.to_dict())
    ir.save(model, str(path))


def quantize_int8(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """ONNX Runtime post-training dynamic INT8 of ``src`` into ``dst``, atomically.

    ``quantize_dynamic(weight_type=QInt8, per_channel=True)`` (ONNX Runtime quantisation docs,
    "Dynamic quantization"): symmetric per-output-channel INT8 weights of every MatMul, INT8
    activations with a per-tensor scale computed at run time. Keeps the ``mla.model`` metadata.

    Returns:
        ``dst`` as a ``Path``.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    cfg = OnnxLM.read_config(src)

    def write(tmp: Path) -> None:
        with _quiet():
            quantize_dynamic(str(src), str(tmp), weight_type=QuantType.QInt8, per_channel=True)
        _set_metadata(tmp, cfg)

    return _atomic(Path(dst), write)


class OnnxLM:
    """An exported MLA model run by ONNX Runtime on the CPU, called like the torch model.

    Args:
        path: The ``.onnx`` file (fp32 or INT8) written by :func:`export_onnx`.
        threads: ONNX Runtime intra-op threads (``0``: ONNX Runtime's default, all cores).

    Attributes:
        cfg: The model config stored in the file.
        path: The file.
        seq_len: The sequence length the graph takes, in tokens.
    """

    def __init__(self, path: str | os.PathLike, threads: int = 1) -> None:
        import onnxruntime as ort

        self.path = Path(path)
        self.cfg = self.read_config(path)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.seq_len = int(self.session.get_inputs()[0].shape[1])

    @staticmethod
    def read_config(path: str | os.PathLike) -> ModelConfig:
        """The :class:`ModelConfig` stored in an exported file.

        Raises:
            FileNotFoundError: ``path`` does not exist.
            ValueError: the file is not an ONNX model written by :func:`export_onnx`.
        """
        import onnx

        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"{p} does not exist (write one with `mla compress`)")
        try:
            meta = {
                m.key: m.value for m in onnx.load(str(p), load_external_data=False).metadata_props
            }
        except Exception as exc:  # onnx raises DecodeError and friends for non-ONNX files
            raise ValueError(f"{p} is not an ONNX model ({type(exc).__name__})") from None
        if META_KEY not in meta:
            raise ValueError(f"{p} has no {META_KEY!r} metadata: it was not exported by mla")
        return ModelConfig(**json.loads(meta[META_KEY]))

    def __call__(self, tokens: np.ndarray | torch.Tensor) -> np.ndarray:
        """Logits ``(batch, seq, vocab)`` float32 for ``tokens`` ``(batch, seq)`` int64.

        Raises:
            ValueError: ``seq`` is not the length the file was exported for (:attr:`seq_len`).
        """
        if isinstance(tokens, torch.Tensor):
            tokens = tokens.numpy()
        if tokens.ndim != 2 or tokens.shape[1] != self.seq_len:
            raise ValueError(
                f"{self.path} takes (batch, {self.seq_len}) token windows, got shape "
                f"{tuple(tokens.shape)}; use --seq-len {self.seq_len} or export again with "
                "another length"
            )
        return self.session.run(None, {"tokens": np.ascontiguousarray(tokens, dtype=np.int64)})[0]

    @property
    def size_bytes(self) -> int:
        """Size of the file on disk."""
        return onnx_size_bytes(self.path)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the exporter's and quantiser's advisory warnings and log lines (torchvision
    missing, "consider pre-processing"), which say nothing about this model."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        previous = logging.root.manager.disable
        logging.disable(logging.WARNING)
        try:
            yield
        finally:
            logging.disable(previous)


def _set_metadata(path: Path, cfg: ModelConfig) -> None:
    import onnx

    proto = onnx.load(str(path))
    del proto.metadata_props[:]
    entry = proto.metadata_props.add()
    entry.key, entry.value = META_KEY, json.dumps(cfg.to_dict())
    onnx.save(proto, str(path))


def _atomic(dst: Path, write) -> Path:
    """Run ``write(tmp)`` on a temporary file next to ``dst``; fsync, then rename onto ``dst``."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".tmp-{dst.name}-", suffix=".onnx", dir=dst.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, dst)
    finally:
        for leftover in (tmp, tmp.with_name(tmp.name + ".data")):
            leftover.unlink(missing_ok=True)
    return dst
