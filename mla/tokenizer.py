"""The byte-level tokenizer the workers train with: one token id per UTF-8 byte (256 ids).

Encoding is ``text.encode("utf-8", errors="replace")`` exactly as :mod:`workers.data` does it;
decoding turns ids back into bytes and UTF-8 text, replacing invalid sequences (a sampled byte
stream need not be valid UTF-8). :class:`StreamDecoder` decodes a stream token by token, holding
back the bytes of a multi-byte character until it is complete.
"""

from __future__ import annotations

import codecs

#: Description written into exports (``config.json``'s ``tokenizer``) and read back.
TOKENIZER_INFO = {
    "type": "bytes",
    "encoding": "utf-8",
    "vocab_size": 256,
    "description": "one token id per UTF-8 byte of the text (ids 0-255), no special tokens",
}


def encode(text: str) -> list[int]:
    """Token ids of ``text``: its UTF-8 bytes (invalid surrogates replaced)."""
    return list(text.encode("utf-8", errors="replace"))


def decode(ids: list[int]) -> str:
    """Text of byte ids (``0 <= id < 256``); invalid UTF-8 becomes U+FFFD.

    Raises:
        ValueError: an id outside 0..255.
    """
    return bytes(_check(ids)).decode("utf-8", errors="replace")


class StreamDecoder:
    """Incremental UTF-8 decoder for streaming generated ids.

    Example:
        >>> d = StreamDecoder()
        >>> d.feed([0xC3]), d.feed([0xA9])
        ('', 'é')
    """

    def __init__(self) -> None:
        self._dec = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, ids: list[int]) -> str:
        """Text completed by ``ids`` (may be empty while a character is incomplete)."""
        return self._dec.decode(bytes(_check(ids)))

    def flush(self) -> str:
        """Whatever is left (an incomplete character becomes U+FFFD)."""
        return self._dec.decode(b"", final=True)


def _check(ids: list[int]) -> list[int]:
    bad = [i for i in ids if not 0 <= int(i) < 256]
    if bad:
        raise ValueError(f"byte tokenizer ids must be in 0..255, got {bad[:5]}")
    return [int(i) for i in ids]
