"""JSON Lines input: one string field per record, bad lines named by file and line number.

The one reader of the JSONL files a user hands in: training corpora (``{"text": ...}``,
``workers.data``) and prompt files (``{"prompt": ...}``, ``mla generate --prompt-file``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator

from orchestrator.contract.errors import MLAError


def jsonl_strings(
    path: str | os.PathLike, lines: Iterable[str], field: str, error: type[MLAError]
) -> Iterator[tuple[int, str]]:
    """``(line number, record[field])`` for every non-blank line; line numbers start at 1.

    Args:
        path: The file's name, for messages only (the caller opens it).
        lines: Its lines, e.g. an open text file or ``text.splitlines()``.
        field: The string field every record must have.
        error: The :class:`MLAError` subclass to raise (``DataError``, ``ConfigError``).

    Raises:
        MLAError: (``error``) a line is not JSON, not an object, or has no string ``field``;
            the message names ``path:line`` and shows the expected shape.

    Example:
        >>> from orchestrator.contract.errors import DataError
        >>> lines = ['{"text": "hi"}', "", '{"text": "yo"}']
        >>> list(jsonl_strings("a.jsonl", lines, "text", DataError))
        [(1, 'hi'), (3, 'yo')]
    """
    shape = f'each line must look like {{"{field}": "..."}}'
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise error(f"{path}:{lineno}: not valid JSON ({exc.msg}); {shape}") from None
        if not isinstance(record, dict) or not isinstance(record.get(field), str):
            raise error(f"{path}:{lineno}: line has no string {field!r} field; {shape}")
        yield lineno, record[field]
