"""Training text: discovery, validation, tokenization and layout-independent batches.

Pure Python + numpy (no torch), so the controller validates data before any worker starts.

Sources (``data.path``):
- unset: the source files of the Python standard library that runs the program (tests,
  ``idle_test`` and ``site-packages`` excluded), present on every machine, no download;
- a ``.txt`` (or any text) file; a folder of text files (searched recursively);
- ``.jsonl`` with a ``text`` field per line; ``.parquet`` with a ``text`` column;
- a folder written by ``mla prepare`` (:mod:`workers.prepared`): token shards read by memory map.

Tokenization: each document is tokenized on its own (byte-level by default, or a BPE
:mod:`mla.tokenizer`) and the ids concatenated; ``mla prepare`` builds the same stream.

Split: files (or documents of a JSONL/Parquet file) go to validation when a stable hash of their
name (or index) falls under ``val_fraction``; a single text file is split by position (the last
``val_fraction`` of its bytes). Both are deterministic.

Batches: the train stream is cut into non-overlapping windows of ``seq_len + 1`` tokens, shuffled
once by the seed. Optimizer step ``s`` uses windows ``[s*B, (s+1)*B)`` of that order (B = global
batch), and data-parallel rank ``r`` of ``dp`` reads only its contiguous slice of them. So the
sequences of a step do not depend on the layout (tensor/pipeline/data degrees), which keeps
losses comparable across layouts and across an elastic resize, and each rank reads a disjoint
shard of every step.
"""

from __future__ import annotations

import hashlib
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mla.tokenizer import Tokenizer
from orchestrator.contract.errors import DataError
from orchestrator.contract.jsonl import jsonl_strings
from workers.prepared import ShardedTokens, is_prepared, load_prepared

TEXT_SUFFIXES = {".txt", ".md", ".rst", ".py", ".text", ".csv", ".json", ".html", ".tex", ""}
_EXCLUDED_STDLIB_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__"}


@dataclass(frozen=True)
class Corpus:
    """Tokenized train and validation streams.

    Attributes:
        train: Train token ids, shape ``(n_train,)``: uint8 byte-level ids in memory, uint16 or
            uint32 BPE ids, or memory-mapped shards of a prepared folder.
        val: Validation token ids, shape ``(n_val,)``, the same kind.
        source: Human-readable description of where the text came from.
        n_docs: Number of files or documents read.
        val_bytes: UTF-8 bytes of the validation text (the denominator of bits per byte).
    """

    train: np.ndarray | ShardedTokens
    val: np.ndarray | ShardedTokens
    source: str
    n_docs: int
    val_bytes: int = 0


def stdlib_files() -> list[Path]:
    """The Python standard library's ``.py`` files (tests excluded), sorted by path."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(
        p
        for p in root.rglob("*.py")
        if not _EXCLUDED_STDLIB_DIRS.intersection(p.relative_to(root).parts)
    )


def _is_val(name: str, val_fraction: float) -> bool:
    digest = hashlib.sha1(name.encode()).digest()
    return int.from_bytes(digest[:4], "big") / 2**32 < val_fraction


def _encode(text: str) -> bytes:
    return text.encode("utf-8", errors="replace")


#: Share of undecodable bytes (U+FFFD after UTF-8 decoding) above which a file is binary.
BINARY_REPLACEMENT_FRACTION = 0.1


def _read_text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot be read ({exc.strerror})") from None
    text = data.decode("utf-8", errors="replace")
    check_text(text, data, path)
    return text


def check_text(text: str, data: bytes, where: Path | str) -> None:
    """Refuse binary-looking data: a NUL byte, or more than ``BINARY_REPLACEMENT_FRACTION`` of
    the characters undecodable as UTF-8.

    Raises:
        DataError: naming the file and the evidence.
    """
    if b"\x00" in data:
        raise DataError(
            f"{where}: looks binary (it contains NUL bytes), not text; point data.path at UTF-8 text, "
            "a .jsonl or a .parquet file"
        )
    bad = text.count("\ufffd") - data.decode("utf-8", errors="ignore").count("\ufffd")
    if text and bad > BINARY_REPLACEMENT_FRACTION * len(text):
        raise DataError(
            f"{where}: looks binary ({100 * bad / len(text):.0f}% of it is not valid UTF-8), not text; "
            "convert it to UTF-8 or point data.path at text files"
        )


@dataclass(frozen=True)
class DocRef:
    """One document of a corpus, read lazily: a file (``path``), or bytes already read
    (``data``: a JSONL line, a Parquet row, one split of a single file).

    Attributes:
        name: Name the split hash is taken of (relative path, or record index).
        path: File to read (UTF-8 text, checked by :func:`check_text`), or ``None``.
        data: The document's UTF-8 bytes when already read, or ``None``.
    """

    name: str
    path: str | None = None
    data: bytes | None = None

    def read(self) -> bytes:
        """The document's UTF-8 bytes (invalid sequences replaced).

        Raises:
            DataError: unreadable or binary-looking file.
        """
        return self.data if self.data is not None else _encode(_read_text(Path(self.path or "")))


def _documents(path: Path) -> tuple[list[DocRef], str]:
    """Return the documents of a data path (files not read yet) and a description of it."""
    if path.is_dir():
        files = sorted(
            p
            for p in path.rglob("*")
            if p.is_file()
            and p.suffix.lower() in TEXT_SUFFIXES
            and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
        return [DocRef(str(p.relative_to(path)), str(p)) for p in files], f"folder {path}"
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _jsonl_documents(path), f"JSONL file {path}"
    if suffix == ".parquet":
        return _parquet_documents(path), f"Parquet file {path}"
    return [DocRef(path.name, data=_encode(_read_text(path)))], f"text file {path}"


def _jsonl_documents(path: Path) -> list[DocRef]:
    with path.open(encoding="utf-8", errors="replace") as fh:
        return [
            DocRef(f"{lineno}", data=_encode(text))
            for lineno, text in jsonl_strings(path, fh, "text", DataError)
        ]


def _parquet_documents(path: Path) -> list[DocRef]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for corrupt files
        raise DataError(f"{path}: cannot be read as Parquet ({exc})") from None
    if "text" not in table.column_names:
        raise DataError(
            f"{path}: no 'text' column (columns: {', '.join(table.column_names)}); "
            "rename the text column to 'text'"
        )
    texts = table.column("text").to_pylist()
    return [DocRef(f"{i}", data=_encode(t)) for i, t in enumerate(texts) if isinstance(t, str)]


def corpus_documents(path: str | None) -> tuple[list[DocRef], str]:
    """The non-empty documents of ``data.path`` (``None``: the standard library) and a
    description of the source.

    Raises:
        DataError: missing path, unreadable single file, malformed JSONL/Parquet.
    """
    if path is None:
        root = Path(sysconfig.get_paths()["stdlib"])
        docs = [DocRef(str(p.relative_to(root)), str(p)) for p in stdlib_files()]
        source = f"Python standard library sources ({root})"
    else:
        p = Path(path).expanduser()
        if not p.exists():
            raise DataError(
                f"data.path {str(p)!r} does not exist; point data.path at a text file, a "
                "folder of text files, a .jsonl or a .parquet file, or unset it to use the "
                "Python standard library sources"
            )
        docs, source = _documents(p)
    return [d for d in docs if _non_empty(d)], source


def _non_empty(doc: DocRef) -> bool:
    if doc.data is not None:
        return bool(doc.data)
    try:  # a non-empty file has non-empty UTF-8 (invalid bytes become U+FFFD)
        return Path(doc.path or "").stat().st_size > 0
    except OSError:
        return True  # reading it raises the error that names the file


def split_documents(
    docs: list[DocRef], source: str, val_fraction: float
) -> tuple[list[DocRef], list[DocRef]]:
    """Train and validation documents, in corpus order (see the module docstring for the rule).

    Raises:
        DataError: the corpus is empty.
    """
    if not docs:
        raise DataError(f"{source}: the corpus is empty (no text found)")
    if len(docs) == 1:
        data = docs[0].read()
        cut = int(len(data) * (1 - val_fraction))
        name = docs[0].name
        return [DocRef(name, data=data[:cut])], [DocRef(name, data=data[cut:])]
    train = [d for d in docs if not _is_val(d.name, val_fraction)]
    val = [d for d in docs if _is_val(d.name, val_fraction)]
    if not val:  # tiny corpora: hold out the last document
        train, val = docs[:-1], docs[-1:]
    return train, val


def token_dtype(vocab_size: int) -> np.dtype:
    """Smallest unsigned dtype of prepared shards holding ids below ``vocab_size`` (uint16 or
    uint32, as nanoGPT's and Megatron's token files)."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def encode_document(data: bytes, tokenizer: Tokenizer | None) -> np.ndarray:
    """Token ids of one document's UTF-8 bytes (byte tokenizer: the bytes as uint8)."""
    if tokenizer is None or tokenizer.kind == "byte":
        return np.frombuffer(data, dtype=np.uint8)
    return np.asarray(tokenizer.encode_bytes(data), dtype=token_dtype(tokenizer.vocab_size))


def _tokens(docs: list[DocRef], tokenizer: Tokenizer | None) -> tuple[np.ndarray, int]:
    parts, n_bytes = [], 0
    for doc in docs:
        data = doc.read()
        n_bytes += len(data)
        parts.append(encode_document(data, tokenizer))
    if tokenizer is None or tokenizer.kind == "byte":
        return np.frombuffer(b"".join(p.tobytes() for p in parts), dtype=np.uint8), n_bytes
    return np.concatenate(parts), n_bytes


def load_corpus(
    path: str | None, val_fraction: float = 0.05, tokenizer: Tokenizer | None = None
) -> Corpus:
    """Read, split and tokenize the corpus, or memory-map a prepared folder (``mla prepare``).

    Documents are tokenized one by one and concatenated (byte-level by default: one id per
    UTF-8 byte).

    Args:
        path: ``data.path`` (file, folder or prepared folder), or ``None`` for the
            standard-library corpus.
        val_fraction: Share of documents (or of a single file's bytes) held out; a prepared
            folder keeps the split it was prepared with.
        tokenizer: ``None`` is the byte tokenizer; a prepared folder uses its own.

    Raises:
        DataError: missing path, unreadable file, malformed JSONL/Parquet, empty corpus, or a
            prepared folder whose shards do not match its manifest.
    """
    if path is not None and is_prepared(Path(path).expanduser()):
        return load_prepared(Path(path).expanduser())
    docs, source = corpus_documents(path)
    train_docs, val_docs = split_documents(docs, source, val_fraction)
    train, _ = _tokens(train_docs, tokenizer)
    val, val_bytes = _tokens(val_docs, tokenizer)
    return Corpus(train, val, source, len(docs), val_bytes)


def check_corpus(corpus: Corpus, seq_len: int) -> None:
    """Raise :class:`DataError` unless both splits hold at least one ``seq_len + 1`` window."""
    for split, tokens in (("train", corpus.train), ("validation", corpus.val)):
        if len(tokens) < seq_len + 1:
            raise DataError(
                f"{corpus.source}: the {split} split has {len(tokens)} tokens, shorter than one "
                f"sequence (data.seq_len + 1 = {seq_len + 1}); add text or lower data.seq_len"
            )


class WindowBatches:
    """Layout-independent batches of ``(inputs, targets)`` windows from one token stream.

    Args:
        tokens: Token ids, shape ``(n,)``: an array or memory-mapped shards (read per window).
        seq_len: Tokens per sequence; windows hold ``seq_len + 1`` tokens.
        seed: Shuffle seed (the order is a function of the seed only).
        shuffle: Shuffle windows (train) or keep their order (validation).

    Example:
        >>> b = WindowBatches(np.arange(1000) % 256, seq_len=9, seed=0)
        >>> x, y = b.rank_slice(step=0, global_batch=8, dp_rank=1, dp=2)
        >>> x.shape, (x[:, 1:] == y[:, :-1]).all()
        ((4, 9), True)
    """

    def __init__(
        self, tokens: np.ndarray | ShardedTokens, seq_len: int, seed: int, shuffle: bool = True
    ):
        self.tokens = tokens
        self.seq_len = seq_len
        self.n_windows = (len(tokens) - 1) // seq_len
        if self.n_windows < 1:
            raise DataError(f"{len(tokens)} tokens are fewer than one window of {seq_len + 1}")
        rng = np.random.default_rng(seed)
        # int32 order (4 bytes a window) where it fits: Generator.shuffle draws the same swaps
        # for any dtype, so this is rng.permutation(n_windows) at half the memory.
        dtype = np.int32 if self.n_windows < 2**31 else np.int64
        self.order = np.arange(self.n_windows, dtype=dtype)
        if shuffle:
            rng.shuffle(self.order)

    def windows(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Inputs and targets (int64, shape ``(len(indices), seq_len)``) for sequence numbers
        ``indices`` of the (cyclic, reshuffled per epoch) order."""
        epoch, pos = np.divmod(indices, self.n_windows)
        starts = np.empty_like(pos)
        for e in np.unique(epoch):
            order = (
                self.order
                if e == 0
                else np.random.default_rng([int(e), len(self.order)]).permutation(self.order)
            )
            starts[epoch == e] = order[pos[epoch == e]].astype(np.int64) * self.seq_len
        rows = starts[:, None] + np.arange(self.seq_len + 1)[None, :]
        chunk = np.asarray(self.tokens[rows]).astype(np.int64)
        return chunk[:, :-1], chunk[:, 1:]

    def rank_slice(
        self, step: int, global_batch: int, dp_rank: int, dp: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """The sequences of optimizer step ``step`` that data-parallel rank ``dp_rank`` reads:
        shape ``(global_batch // dp, seq_len)`` each."""
        per_rank = global_batch // dp
        first = step * global_batch + dp_rank * per_rank
        return self.windows(np.arange(first, first + per_rank))
