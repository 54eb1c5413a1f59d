"""Exported models: safetensors weights + ``config.json`` + tokenizer info + README snippet.

Layout of an export folder (``mla export CHECKPOINT --out DIR``)::

    DIR/model.safetensors   every parameter under the model's own names (``tok_emb.weight``,
                            ``blocks.0.attn.wq.weight``, ...), as stored in the checkpoint
                            (fp32), so the round trip is bit-exact; the output head is tied to
                            ``tok_emb.weight`` and not stored twice
    DIR/config.json         {"format", "architecture", "model": ModelConfig fields (shape and
                            attention settings), "tokenizer", "source"}
    DIR/tokenizer.json      the tokenizer description (byte-level UTF-8, 256 ids)
    DIR/README.md           what the model is and how to load it

The folder is written next to its destination under a temporary name and renamed when complete
(an existing destination is replaced only with ``overwrite=True``), so a folder named ``DIR`` is
always whole. :func:`load_pretrained` returns a ready model in eval mode.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from mla.config import ModelConfig
from mla.model import MLATransformer
from mla.staged_dir import staged_dir
from mla.tokenizer import TOKENIZER_FILE, TOKENIZER_INFO, ByteTokenizer, Tokenizer

FORMAT = "mla-pretrained-v1"
WEIGHTS = "model.safetensors"
CONFIG = "config.json"


def is_pretrained_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` looks like an export folder (``config.json`` + ``model.safetensors``)."""
    p = Path(path)
    return (p / CONFIG).is_file() and (p / WEIGHTS).is_file()


def save_pretrained(
    model: MLATransformer,
    out_dir: str | os.PathLike,
    *,
    source: dict | None = None,
    overwrite: bool = False,
    tokenizer: Tokenizer | None = None,
) -> Path:
    """Export ``model`` atomically to ``out_dir``.

    Args:
        model: The model; its parameters are written as they are (dtype included).
        out_dir: Destination folder.
        source: Where the weights came from (checkpoint path, step), stored in ``config.json``.
        overwrite: Replace an existing ``out_dir``.
        tokenizer: The run's tokenizer, stored as ``tokenizer.json`` (default: byte-level).

    Returns:
        ``out_dir`` as a ``Path``.

    Raises:
        OutDirError: ``out_dir`` is a file, exists while ``overwrite`` is false, or cannot be
            created (:func:`mla.staged_dir.staged_dir`).
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    tok = tokenizer or ByteTokenizer()
    with staged_dir(out, overwrite) as tmp:
        tensors = {name: p.detach().contiguous().cpu() for name, p in model.named_parameters()}
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": FORMAT})
        config = {
            "format": FORMAT,
            "architecture": "MLATransformer",
            "model": model.cfg.to_dict(),
            "tokenizer": _tokenizer_info(tok),
            "source": source or {},
        }
        (tmp / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        (tmp / TOKENIZER_FILE).write_text(tok.to_json())
        (tmp / "README.md").write_text(readme_snippet(model.cfg, source or {}))
    return out


def _tokenizer_info(tok: Tokenizer) -> dict:
    """``config.json``'s ``tokenizer`` entry."""
    if tok.kind == "byte":
        return TOKENIZER_INFO
    return {
        "type": tok.kind,
        "vocab_size": tok.vocab_size,
        "file": TOKENIZER_FILE,
        "description": "byte-level BPE (Hugging Face tokenizers); load it with "
        "mla.tokenizer.load_tokenizer(folder)",
    }


def load_pretrained(
    path: str | os.PathLike, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
) -> MLATransformer:
    """Load an export folder written by :func:`save_pretrained`.

    Args:
        path: The folder.
        device: Where to put the model.
        dtype: Cast the parameters (default: as stored, fp32).

    Returns:
        The model, in eval mode.

    Raises:
        FileNotFoundError: ``config.json`` or ``model.safetensors`` is missing.
        ValueError: the config is not an MLA export, or the weights do not fit it (missing,
            unexpected or misshaped tensors are named).
    """
    from safetensors.torch import load_file

    p = Path(path)
    if not is_pretrained_dir(p):
        raise FileNotFoundError(
            f"{p} is not an exported model: it needs {CONFIG} and {WEIGHTS} "
            "(write one with `mla export CHECKPOINT --out DIR`)"
        )
    config = json.loads((p / CONFIG).read_text())
    if config.get("format") != FORMAT:
        raise ValueError(f"{p / CONFIG}: format {config.get('format')!r} is not {FORMAT!r}")
    model = build_model(
        ModelConfig(**config["model"]), load_file(str(p / WEIGHTS)), str(p / WEIGHTS)
    )
    return model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)


def build_model(cfg: ModelConfig, tensors: dict[str, torch.Tensor], where: str) -> MLATransformer:
    """An eval-mode :class:`MLATransformer` of ``cfg`` holding exactly ``tensors``.

    Raises:
        ValueError: a parameter is missing, unexpected or of the wrong shape (all are named).
    """
    with torch.device("meta"):
        model = MLATransformer(cfg)
    expected = dict(model.named_parameters())
    problems = [f"missing {n}" for n in expected if n not in tensors]
    problems += [f"unexpected {n}" for n in tensors if n not in expected]
    problems += [
        f"{n}: shape {tuple(tensors[n].shape)} != {tuple(p.shape)}"
        for n, p in expected.items()
        if n in tensors and tensors[n].shape != p.shape
    ]
    if problems:
        raise ValueError(f"{where} does not fit the model config: " + "; ".join(problems[:6]))
    model = model.to_empty(device="cpu")
    model.load_state_dict(tensors, strict=False, assign=True)
    _rebuild_buffers(model)
    return model.eval()


def _rebuild_buffers(model: MLATransformer) -> None:
    """Recompute the non-persistent rotary tables that ``to_empty`` left uninitialised."""
    from mla.decoding import blocks_of
    from mla.rope import rope_cache

    cfg = model.cfg
    cos, sin = rope_cache(cfg.max_seq_len, cfg.head_dim, cfg.rope_theta)
    for block in blocks_of(model):
        block.attn.rope_cos, block.attn.rope_sin = cos.clone(), sin.clone()


def readme_snippet(cfg: ModelConfig, source: dict) -> str:
    """Markdown describing the export and how to load it."""
    attn = (
        f"multi-level attention (local window {cfg.local_window}, global_k {cfg.global_k}, "
        f"block {cfg.block_size}, indexer {cfg.indexer}, mix {cfg.mix})"
        if cfg.attention == "mla"
        else "dense causal attention"
    )
    origin = (
        f"\nExported from `{source['checkpoint']}` (step {source.get('step')}).\n"
        if "checkpoint" in source
        else ""
    )
    return f"""# MLA language model

Decoder-only transformer with {attn}: d_model {cfg.d_model}, {cfg.n_layers} layers, {cfg.n_heads} heads
({cfg.kv_heads} key/value heads), SwiGLU {cfg.ffn_hidden}, max_seq_len {cfg.max_seq_len}, vocab {cfg.vocab_size}.
Tokenizer: one token per UTF-8 byte (ids 0-255). MLA here is Dynamic Multi-Level Attention, not
DeepSeek's Multi-head Latent Attention.
{origin}
```python
import mla
from mla.tokenizer import encode, decode
model = mla.load_pretrained("path/to/this/folder")
```

```bash
mla generate path/to/this/folder --prompt "def " --max-new-tokens 200
mla eval path/to/this/folder --data some.txt
```
"""
