"""``mla prepare``: tokenize a corpus once into memory-mappable token shards plus a manifest.

The documents and their train/validation split are exactly those of :func:`workers.data.
load_corpus` (the same loader, rules and error messages); each document is read and tokenized by
a Ray Data task (``workers`` of them at once, on the embedded Ray or on a cluster), and the driver
appends the tokens, in corpus order, to shards of at most ``shard_tokens`` ids. Everything is
written into a temporary folder renamed into place whole (:func:`mla.staged_dir.staged_dir`), the
manifest last (:func:`orchestrator.contract.io.write_json_atomic`): a reader sees a complete
folder or none. Re-running on unchanged input (same files, sizes and modification times, same
tokenizer, same split) leaves the folder as it is.

This module imports Ray and numpy only inside functions.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from orchestrator.contract.errors import DataError

#: Ids per shard file (1 GiB of uint32, 512 MiB of uint16), as Megatron's 1B-token files.
SHARD_TOKENS = 2**28
#: Documents per Ray Data batch (one task tokenizes a batch).
DOCS_PER_TASK = 64


@dataclass(frozen=True)
class PrepareResult:
    """What :func:`prepare_corpus` did.

    Attributes:
        out: The prepared folder.
        skipped: True when the folder was already up to date (nothing written).
        manifest: Its manifest.
        seconds: Wall time of the whole call.
        bytes_read: UTF-8 bytes of text tokenized (0 when skipped).
    """

    out: Path
    skipped: bool
    manifest: dict
    seconds: float
    bytes_read: int


def source_fingerprint(docs, val_fraction: float, tokenizer_sha: str) -> str:
    """SHA-256 over each document's name, file size and modification time (or its bytes, for
    records already read), the split share and the tokenizer hash: equal iff a re-run would write
    the same shards (the size + mtime rule of ``make`` and ``rsync``)."""
    h = hashlib.sha256(f"{val_fraction!r}\0{tokenizer_sha}\0".encode())
    for d in docs:
        if d.path is not None:
            try:
                st = os.stat(d.path)
                h.update(f"{d.name}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
            except OSError:
                h.update(f"{d.name}\0missing\0".encode())
        else:
            h.update(d.name.encode() + b"\0" + hashlib.sha256(d.data or b"").digest())
    return h.hexdigest()


class _ShardWriter:
    """Appends token arrays of one split to ``SPLIT-NNNNN.bin`` files of ``limit`` ids."""

    def __init__(self, folder: Path, split: str, dtype, limit: int) -> None:
        self.folder, self.split, self.dtype, self.limit = folder, split, dtype, limit
        self.shards: list[dict] = []
        self.fh: BinaryIO | None = None
        self.tokens = 0
        self.bytes = 0
        self.docs = 0

    def _open(self) -> None:
        name = f"{self.split}-{len(self.shards):05d}.bin"
        self.fh = open(self.folder / name, "wb")  # noqa: SIM115 (closed in _close)
        self.shards.append({"file": name, "tokens": 0})

    def _close(self) -> None:
        if self.fh is not None:
            self.fh.close()
            self.fh = None

    def add(self, tokens, n_bytes: int) -> None:
        self.docs += 1
        self.bytes += n_bytes
        tokens = tokens.astype(self.dtype, copy=False)
        while len(tokens):
            if self.fh is None or self.shards[-1]["tokens"] >= self.limit:
                self._close()
                self._open()
            room = self.limit - self.shards[-1]["tokens"]
            part, tokens = tokens[:room], tokens[room:]
            part.tofile(self.fh)
            self.shards[-1]["tokens"] += len(part)
            self.tokens += len(part)

    def finish(self) -> dict:
        self._close()
        return {"tokens": self.tokens, "bytes": self.bytes, "shards": self.shards}


def _encode_rows(rows: list[dict], tokenizer_json: str) -> list[dict]:
    """Read and tokenize documents; an unreadable one gives its error message instead."""
    from mla.tokenizer import tokenizer_from_json
    from workers.data import DocRef, encode_document, token_dtype

    tok = _cached_tokenizer(tokenizer_json, tokenizer_from_json)
    out = []
    for r in rows:
        doc = DocRef(r["name"], r["path"] or None, r["data"])
        try:
            data = doc.read()
        except DataError as exc:
            out.append({**r, "tokens": b"", "n_bytes": 0, "error": str(exc)})
            continue
        ids = encode_document(data, tok).astype(token_dtype(tok.vocab_size), copy=False)
        out.append({**r, "tokens": ids.tobytes(), "n_bytes": len(data), "error": ""})
    return out


_TOKENIZERS: dict = {}


def _cached_tokenizer(text: str, build):
    key = hashlib.sha256(text.encode()).hexdigest()
    if key not in _TOKENIZERS:
        _TOKENIZERS[key] = build(text)
    return _TOKENIZERS[key]


def _rows(train_docs, val_docs) -> list[dict]:
    return [
        {"split": split, "name": d.name, "path": d.path or "", "data": d.data}
        for split, docs in (("train", train_docs), ("validation", val_docs))
        for d in docs
    ]


def _local_batches(rows: list[dict], tokenizer_json: str):
    for i in range(0, len(rows), DOCS_PER_TASK):
        yield _encode_rows(rows[i : i + DOCS_PER_TASK], tokenizer_json)


def _ray_batches(rows: list[dict], tokenizer_json: str, workers: int):
    """Tokenize with Ray Data, ``workers`` tasks at a time, in corpus order."""
    import pandas as pd
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = False

    def encode(batch: pd.DataFrame) -> pd.DataFrame:
        records = batch.to_dict("records")
        for r in records:  # pandas turns a missing value into NaN
            r["data"] = r["data"] if isinstance(r["data"], bytes) else None
        return pd.DataFrame(_encode_rows(records, tokenizer_json))

    items = ray.data.from_items(rows, override_num_blocks=max(1, len(rows) // DOCS_PER_TASK))
    ds = items.map_batches(
        encode, batch_size=DOCS_PER_TASK, batch_format="pandas", num_cpus=1, concurrency=workers
    )
    frame: Any
    for frame in ds.iter_batches(batch_size=None, batch_format="pandas"):
        yield frame.to_dict("records")


def prepare_corpus(
    path: str | None,
    out: str | os.PathLike,
    tokenizer: str = "byte",
    val_fraction: float = 0.05,
    workers: int = 2,
    shard_tokens: int = SHARD_TOKENS,
    ray_session: Callable[[], AbstractContextManager] | None = None,
) -> PrepareResult:
    """Prepare ``path`` (anything ``data.path`` accepts) into ``out``.

    Args:
        path: Text file, folder, ``.jsonl``, ``.parquet``, or ``None`` for the standard library.
        out: The prepared folder to write (replaced when its input changed).
        tokenizer: ``byte`` or the path of a ``tokenizer.json``.
        val_fraction: Share of documents held out (as ``data.val_fraction``).
        workers: Ray Data tasks at once on the connected Ray; 0 tokenizes in this process.
        shard_tokens: Ids per shard file.
        ray_session: Opens (and closes) the Ray connection around the tokenization, entered only
            when there is work to do (bad input or an up-to-date folder never starts Ray);
            ``None`` uses a Ray already connected.

    Raises:
        DataError: the loader's errors (missing path, binary or malformed files, empty corpus).
        ConfigError: a bad tokenizer.
        OutDirError: ``out`` is a file, or an existing folder that is not a prepared folder.
    """
    import numpy as np

    from mla.staged_dir import OutDirError, staged_dir
    from mla.tokenizer import load_tokenizer, tokenizer_digest
    from orchestrator.contract.errors import ConfigError
    from orchestrator.contract.io import write_json_atomic
    from workers.data import corpus_documents, split_documents, token_dtype
    from workers.prepared import FORMAT, MANIFEST, is_prepared, read_manifest

    t0 = time.perf_counter()
    out = Path(out)
    try:
        tok = load_tokenizer(tokenizer)
    except ValueError as exc:
        raise ConfigError(str(exc).replace("data.tokenizer", "--tokenizer")) from None
    sha = tokenizer_digest(tok)
    docs, source = corpus_documents(path)
    fingerprint = source_fingerprint(docs, val_fraction, sha)
    if is_prepared(out):
        old = read_manifest(out)
        if old.get("fingerprint") == fingerprint:
            return PrepareResult(out, True, old, time.perf_counter() - t0, 0)
    elif out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise OutDirError(
            f"--out {out} exists and is not an `mla prepare` folder (no {MANIFEST}); choose a "
            "new or empty folder"
        )
    train_docs, val_docs = split_documents(docs, source, val_fraction)
    rows = _rows(train_docs, val_docs)
    dtype = token_dtype(tok.vocab_size)
    tokenizer_json = tok.to_json()
    with (
        staged_dir(out, overwrite=True) as tmp,
        ray_session() if workers and ray_session else nullcontext(),
    ):
        writers = {s: _ShardWriter(tmp, s, dtype, shard_tokens) for s in ("train", "validation")}
        batches = (
            _ray_batches(rows, tokenizer_json, workers)
            if workers
            else _local_batches(rows, tokenizer_json)
        )
        for batch in batches:
            for r in batch:
                if r["error"]:
                    raise DataError(r["error"])
                writers[r["split"]].add(np.frombuffer(r["tokens"], dtype=dtype), int(r["n_bytes"]))
        splits = {s: w.finish() for s, w in writers.items()}
        (tmp / "tokenizer.json").write_text(tokenizer_json)
        manifest = {
            "format": FORMAT,
            "version": 1,
            "source": source,
            "fingerprint": fingerprint,
            "val_fraction": val_fraction,
            "tokenizer": {"kind": tok.kind, "vocab_size": tok.vocab_size, "sha256": sha},
            "dtype": dtype.name,
            "documents": {s: w.docs for s, w in writers.items()},
            "splits": splits,
        }
        write_json_atomic(tmp / MANIFEST, manifest)  # last: it proves the rest is complete
    n_bytes = sum(s["bytes"] for s in splits.values())
    return PrepareResult(out, False, manifest, time.perf_counter() - t0, n_bytes)


def describe(result: PrepareResult) -> str:
    """One line about a prepare run."""
    m = result.manifest
    tr, va = m["splits"]["train"], m["splits"]["validation"]
    what = "up to date, nothing written" if result.skipped else f"wrote {result.out}"
    rate = (
        f", {result.bytes_read / 1e6 / result.seconds:.1f} MB/s"
        if result.bytes_read and result.seconds
        else ""
    )
    return (
        f"{what}: {m['documents']['train']} + {m['documents']['validation']} documents, "
        f"{tr['tokens']:,} train / {va['tokens']:,} validation tokens ({m['dtype']}, "
        f"{m['tokenizer']['kind']} tokenizer, vocab {m['tokenizer']['vocab_size']}) in "
        f"{result.seconds:.1f} s{rate}"
    )


def _json(result: PrepareResult) -> str:
    return json.dumps({"out": str(result.out), "skipped": result.skipped, **result.manifest})
