"""Training text: discovery, validation, byte-level tokenization and layout-independent batches.

Pure Python + numpy (no torch), so the controller validates data before any worker starts.

Sources (``data.path``):
- unset: the source files of the Python standard library that runs the program (tests,
  ``idle_test`` and ``site-packages`` excluded), present on every machine, no download;
- a ``.txt`` (or any text) file; a folder of text files (searched recursively);
- ``.jsonl`` with a ``text`` field per line; ``.parquet`` with a ``text`` column.

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

from orchestrator.contract.errors import DataError
from orchestrator.contract.jsonl import jsonl_strings

TEXT_SUFFIXES = {".txt", ".md", ".rst", ".py", ".text", ".csv", ".json", ".html", ".tex", ""}
_EXCLUDED_STDLIB_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__"}


@dataclass(frozen=True)
class Corpus:
    """Tokenized train and validation streams.

    Attributes:
        train: Train token ids, shape ``(n_train,)``, dtype uint8 (byte-level ids 0-255).
        val: Validation token ids, shape ``(n_val,)``, dtype uint8.
        source: Human-readable description of where the text came from.
        n_docs: Number of files or documents read.
    """

    train: np.ndarray
    val: np.ndarray
    source: str
    n_docs: int


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


def _documents(path: Path) -> tuple[list[tuple[str, bytes]], str]:
    """Return ``[(name, bytes)]`` documents of a data path and a description of it."""
    if path.is_dir():
        files = sorted(
            p
            for p in path.rglob("*")
            if p.is_file()
            and p.suffix.lower() in TEXT_SUFFIXES
            and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
        return [(str(p.relative_to(path)), _encode(_read_text(p))) for p in files], f"folder {path}"
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _jsonl_documents(path), f"JSONL file {path}"
    if suffix == ".parquet":
        return _parquet_documents(path), f"Parquet file {path}"
    return [(path.name, _encode(_read_text(path)))], f"text file {path}"


def _jsonl_documents(path: Path) -> list[tuple[str, bytes]]:
    with path.open(encoding="utf-8", errors="replace") as fh:
        return [
            (f"{lineno}", _encode(text))
            for lineno, text in jsonl_strings(path, fh, "text", DataError)
        ]


def _parquet_documents(path: Path) -> list[tuple[str, bytes]]:
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
    return [(f"{i}", _encode(t)) for i, t in enumerate(texts) if isinstance(t, str)]


def load_corpus(path: str | None, val_fraction: float = 0.05) -> Corpus:
    """Read, split and tokenize the corpus (byte-level: one id per UTF-8 byte).

    Args:
        path: ``data.path`` (file or folder), or ``None`` for the standard-library corpus.
        val_fraction: Share of documents (or of a single file's bytes) held out.

    Raises:
        DataError: missing path, unreadable file, malformed JSONL/Parquet, empty corpus.
    """
    if path is None:
        files = stdlib_files()
        root = Path(sysconfig.get_paths()["stdlib"])
        docs = [(str(p.relative_to(root)), _encode(_read_text(p))) for p in files]
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
    docs = [(name, data) for name, data in docs if data]
    if not docs:
        raise DataError(f"{source}: the corpus is empty (no text found)")
    if len(docs) == 1:
        data = docs[0][1]
        cut = int(len(data) * (1 - val_fraction))
        train, val = data[:cut], data[cut:]
    else:
        train = b"".join(d for n, d in docs if not _is_val(n, val_fraction))
        val = b"".join(d for n, d in docs if _is_val(n, val_fraction))
        if not val:  # tiny corpora: hold out the last document
            train, val = b"".join(d for _, d in docs[:-1]), docs[-1][1]
    return Corpus(
        np.frombuffer(train, dtype=np.uint8), np.frombuffer(val, dtype=np.uint8), source, len(docs)
    )


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
        tokens: Token ids, shape ``(n,)``.
        seq_len: Tokens per sequence; windows hold ``seq_len + 1`` tokens.
        seed: Shuffle seed (the order is a function of the seed only).
        shuffle: Shuffle windows (train) or keep their order (validation).

    Example:
        >>> b = WindowBatches(np.arange(1000) % 256, seq_len=9, seed=0)
        >>> x, y = b.rank_slice(step=0, global_batch=8, dp_rank=1, dp=2)
        >>> x.shape, (x[:, 1:] == y[:, :-1]).all()
        ((4, 9), True)
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, seed: int, shuffle: bool = True):
        self.tokens = tokens
        self.seq_len = seq_len
        self.n_windows = (len(tokens) - 1) // seq_len
        if self.n_windows < 1:
            raise DataError(f"{len(tokens)} tokens are fewer than one window of {seq_len + 1}")
        rng = np.random.default_rng(seed)
        self.order = rng.permutation(self.n_windows) if shuffle else np.arange(self.n_windows)

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
            starts[epoch == e] = order[pos[epoch == e]] * self.seq_len
        rows = starts[:, None] + np.arange(self.seq_len + 1)[None, :]
        chunk = self.tokens[rows].astype(np.int64)
        return chunk[:, :-1], chunk[:, 1:]

    def rank_slice(
        self, step: int, global_batch: int, dp_rank: int, dp: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """The sequences of optimizer step ``step`` that data-parallel rank ``dp_rank`` reads:
        shape ``(global_batch // dp, seq_len)`` each."""
        per_rank = global_batch // dp
        first = step * global_batch + dp_rank * per_rank
        return self.windows(np.arange(first, first + per_rank))
