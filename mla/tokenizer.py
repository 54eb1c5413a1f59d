"""Tokenizers the workers train with: byte-level (default) or a byte-level BPE ``tokenizer.json``.

The byte tokenizer maps one UTF-8 byte to one id (256 ids). Encoding is
``text.encode("utf-8", errors="replace")`` exactly as :mod:`workers.data` does it; decoding turns
ids back into bytes and UTF-8 text, replacing invalid sequences (a sampled byte stream need not
be valid UTF-8). :class:`StreamDecoder` decodes a stream token by token, holding back the bytes
of a multi-byte character until it is complete.

The BPE tokenizer is a Hugging Face ``tokenizers`` model (Rust; ``tokenizer.json`` is its own
format) with a byte-level pre-tokenizer and decoder (GPT-2's scheme, Radford et al. 2019), so any
text round-trips and every token is a byte string. :func:`train_bpe` trains one
(``mla tokenizer train``); :func:`load_tokenizer` reads ``byte`` or a ``tokenizer.json`` path;
:func:`tokenizer_from_json` rebuilds the one a checkpoint or export stores.
"""

from __future__ import annotations

import codecs
import hashlib
import json
from collections.abc import Iterable
from functools import cached_property
from pathlib import Path
from typing import Protocol

#: Description written into exports (``config.json``'s ``tokenizer``) and read back.
TOKENIZER_INFO = {
    "type": "bytes",
    "encoding": "utf-8",
    "vocab_size": 256,
    "description": "one token id per UTF-8 byte of the text (ids 0-255), no special tokens",
}

#: File name of the tokenizer inside checkpoints, exports and prepared data folders.
TOKENIZER_FILE = "tokenizer.json"


class Tokenizer(Protocol):
    """What training, evaluation and generation need from a tokenizer."""

    kind: str
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...
    def encode_bytes(self, data: bytes) -> list[int]: ...
    def token_bytes(self, ids: list[int]) -> bytes: ...
    def decode(self, ids: list[int]) -> str: ...
    def to_json(self) -> str: ...


def encode(text: str) -> list[int]:
    """Token ids of ``text``: its UTF-8 bytes (invalid surrogates replaced)."""
    return list(text.encode("utf-8", errors="replace"))


def decode(ids: list[int]) -> str:
    """Text of byte ids (``0 <= id < 256``); invalid UTF-8 becomes U+FFFD.

    Raises:
        ValueError: an id outside 0..255.
    """
    return bytes(_check(ids)).decode("utf-8", errors="replace")


class ByteTokenizer:
    """One id per UTF-8 byte (ids 0-255, no special tokens)."""

    kind = "byte"
    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        """Ids of ``text`` (see :func:`encode`)."""
        return encode(text)

    def encode_bytes(self, data: bytes) -> list[int]:
        """Ids of raw bytes: the bytes themselves."""
        return list(data)

    def token_bytes(self, ids: list[int]) -> bytes:
        """The bytes the ids stand for.

        Raises:
            ValueError: an id outside 0..255.
        """
        return bytes(_check(ids))

    def decode(self, ids: list[int]) -> str:
        """Text of ``ids`` (see :func:`decode`)."""
        return decode(ids)

    def to_json(self) -> str:
        """The description stored as ``tokenizer.json``."""
        return json.dumps(TOKENIZER_INFO, indent=2) + "\n"


class BPETokenizer:
    """A byte-level BPE ``tokenizers.Tokenizer``.

    Args:
        hf: The Hugging Face tokenizer (byte-level pre-tokenizer and decoder).
    """

    kind = "bpe"

    def __init__(self, hf) -> None:
        self.hf = hf
        self.vocab_size = int(hf.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str) -> list[int]:
        """Ids of ``text`` (no special tokens added)."""
        return list(self.hf.encode(text, add_special_tokens=False).ids)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Ids of each text, encoded in parallel by the Rust library."""
        return [list(e.ids) for e in self.hf.encode_batch(texts, add_special_tokens=False)]

    def encode_bytes(self, data: bytes) -> list[int]:
        """Ids of raw bytes, decoded as UTF-8 (invalid sequences become U+FFFD)."""
        return self.encode(data.decode("utf-8", errors="replace"))

    @cached_property
    def _bytes_of_id(self) -> list[bytes]:
        inverse = {ch: b for b, ch in _bytes_to_unicode().items()}
        table = [b""] * self.vocab_size
        for token, i in self.hf.get_vocab(with_added_tokens=True).items():
            table[i] = bytes(inverse[c] for c in token if c in inverse)
        return table

    def token_bytes(self, ids: list[int]) -> bytes:
        """The bytes the ids stand for (a token may end inside a multi-byte character).

        Raises:
            ValueError: an id outside ``0..vocab_size-1``.
        """
        bad = [i for i in ids if not 0 <= int(i) < self.vocab_size]
        if bad:
            raise ValueError(
                f"BPE tokenizer ids must be in 0..{self.vocab_size - 1}, got {bad[:5]}"
            )
        return b"".join(self._bytes_of_id[int(i)] for i in ids)

    def decode(self, ids: list[int]) -> str:
        """Text of ``ids``; invalid UTF-8 becomes U+FFFD."""
        return self.token_bytes(ids).decode("utf-8", errors="replace")

    def to_json(self) -> str:
        """The ``tokenizer.json`` text (Hugging Face's format)."""
        return self.hf.to_str()


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by byte-level BPE
    (``bytes_to_unicode`` in openai/gpt-2 ``src/encoder.py``; the same table as
    ``tokenizers.pre_tokenizers.ByteLevel``)."""
    keep = list(range(ord("!"), ord("~") + 1))
    keep += list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, n = list(keep), 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(keep, chars, strict=True)}


def tokenizer_digest(tok: Tokenizer) -> str:
    """SHA-256 (hex) of the tokenizer's ``tokenizer.json`` text: two runs share tokens iff equal."""
    return hashlib.sha256(tok.to_json().encode()).hexdigest()


def tokenizer_from_json(text: str, where: str = "tokenizer.json") -> Tokenizer:
    """The tokenizer a ``tokenizer.json`` text describes (the byte description or a HF BPE file).

    Raises:
        ValueError: not JSON, or neither of the two formats (names ``where``).
    """
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"{where}: not a tokenizer.json (invalid JSON: {exc})") from None
    if isinstance(data, dict) and data.get("type") == TOKENIZER_INFO["type"]:
        return ByteTokenizer()
    if not isinstance(data, dict) or "model" not in data:
        raise ValueError(
            f"{where}: not a tokenizer.json (no 'model'); train one with `mla tokenizer train`"
        )
    from tokenizers import Tokenizer as HFTokenizer

    try:
        return BPETokenizer(HFTokenizer.from_str(text))
    except Exception as exc:  # the Rust library raises a bare Exception
        raise ValueError(f"{where}: cannot be read by HF tokenizers ({exc})") from None


def load_tokenizer(spec: str | Path | None) -> Tokenizer:
    """``byte`` (or ``None``) or the path of a ``tokenizer.json``.

    Raises:
        ValueError: ``bpe`` (trained by ``mla train`` at launch, not a file), or the path does
            not exist, is not UTF-8 text or is not a tokenizer file.
    """
    if spec is None or str(spec) == "byte":
        return ByteTokenizer()
    if str(spec) == "bpe":
        raise ValueError(
            "'bpe' is trained by `mla train` at launch and is not a file here; train one first "
            "(`mla tokenizer train DATA --vocab-size N --out tokenizer.json`) and pass that file"
        )
    path = Path(spec).expanduser()
    if path.is_dir():
        path = path / TOKENIZER_FILE
    if not path.is_file():
        raise ValueError(
            f"data.tokenizer {str(spec)!r}: no such tokenizer.json; use 'byte', 'bpe', or a "
            "file from `mla tokenizer train DATA --vocab-size N --out tokenizer.json`"
        )
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(
            f"{path}: not a tokenizer.json (byte {exc.start} is not UTF-8 text); train one with "
            "`mla tokenizer train DATA --vocab-size N --out tokenizer.json`"
        ) from None
    return tokenizer_from_json(text, str(path))


def train_bpe(texts: Iterable[str], vocab_size: int) -> BPETokenizer:
    """Train a byte-level BPE tokenizer (Sennrich et al. 2016; GPT-2's byte-level variant).

    The 256 byte symbols are always in the vocabulary (any text encodes); merges fill it up to
    ``vocab_size`` ids. No special tokens.

    Args:
        texts: Training documents (the training split only).
        vocab_size: Vocabulary size, at least 257.

    Raises:
        ValueError: ``vocab_size`` below 257.
    """
    if vocab_size < 257:
        raise ValueError(
            f"--vocab-size {vocab_size}: a BPE vocabulary needs more than the 256 byte symbols; "
            "use e.g. 4096, or data.tokenizer=byte"
        )
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        show_progress=False,
    )
    hf.train_from_iterator(texts, trainer=trainer)
    return BPETokenizer(hf)


class StreamDecoder:
    """Incremental UTF-8 decoder for streaming generated ids.

    Args:
        tokenizer: Maps ids to bytes; the byte tokenizer by default.

    Example:
        >>> d = StreamDecoder()
        >>> d.feed([0xC3]), d.feed([0xA9])
        ('', 'é')
    """

    def __init__(self, tokenizer: Tokenizer | None = None) -> None:
        self._tok = tokenizer or ByteTokenizer()
        self._dec = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, ids: list[int]) -> str:
        """Text completed by ``ids`` (may be empty while a character is incomplete)."""
        return self._dec.decode(self._tok.token_bytes(ids))

    def flush(self) -> str:
        """Whatever is left (an incomplete character becomes U+FFFD)."""
        return self._dec.decode(b"", final=True)


def _check(ids: list[int]) -> list[int]:
    bad = [i for i in ids if not 0 <= int(i) < 256]
    if bad:
        raise ValueError(f"byte tokenizer ids must be in 0..255, got {bad[:5]}")
    return [int(i) for i in ids]
