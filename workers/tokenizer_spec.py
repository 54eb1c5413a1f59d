"""Which tokenizer a job trains with, and the vocabulary size it implies.

``data.tokenizer`` is ``byte`` (default: one id per UTF-8 byte), ``bpe`` (a byte-level BPE of
``model.vocab_size`` ids trained on the training split when the run starts, kept in
``RUN_DIR/tokenizer.json`` so a resumed run uses the same one), or the path of a
``tokenizer.json`` (``mla tokenizer train``). A prepared folder (``mla prepare``) as
``data.path`` brings its own tokenizer; an explicit ``data.tokenizer`` must then be the same one.

``model.vocab_size`` follows the tokenizer when unset; an explicit value smaller than the
tokenizer's vocabulary is an error naming both (a larger one pads the embedding).

Imports of the tokenizer library happen inside functions (this module is imported by the
config).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orchestrator.contract.errors import ConfigError

if TYPE_CHECKING:
    from mla.tokenizer import Tokenizer

#: An ``orchestrator.config.JobConfig`` (not imported: the data plane reaches the control plane
#: only through ``orchestrator.contract``).
JobConfig = Any

RUN_TOKENIZER = "tokenizer.json"


def tokenizer_file(job: JobConfig) -> Path | None:
    """The ``tokenizer.json`` the job trains with, or ``None`` for the byte tokenizer.

    Raises:
        ConfigError: an explicit ``data.tokenizer`` differs from a prepared folder's own.
    """
    from workers.prepared import prepared_tokenizer_path

    spec = job.data.tokenizer
    prepared = prepared_tokenizer_path(job.data.path)
    if prepared is not None:
        if "tokenizer" in job.data.model_fields_set and spec != "bpe":
            mine, theirs = _digest(None if spec == "byte" else spec), _digest(str(prepared))
            if mine != theirs:
                raise ConfigError(
                    f"data.tokenizer={spec!r} is not the tokenizer data.path {job.data.path} was "
                    f"prepared with ({prepared}); unset data.tokenizer or run `mla prepare` "
                    "again with --tokenizer"
                )
        return prepared
    if spec == "byte":
        return None
    if spec == "bpe":
        return job.run_dir / RUN_TOKENIZER
    return Path(spec).expanduser()


def job_tokenizer(job: JobConfig) -> Tokenizer:
    """Load the job's tokenizer.

    Raises:
        ConfigError: the file is missing or not a tokenizer (``bpe``: not trained yet).
    """
    from mla.tokenizer import ByteTokenizer, load_tokenizer

    path = tokenizer_file(job)
    if path is None:
        return ByteTokenizer()
    try:
        return load_tokenizer(path)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def tokenizer_vocab_size(job: JobConfig) -> tuple[int, str]:
    """``(ids, description)`` of the job's tokenizer (``bpe`` not yet trained: the
    ``model.vocab_size`` it will be trained to).

    Raises:
        ConfigError: ``bpe`` without a ``model.vocab_size`` above 256, or a bad tokenizer file.
    """
    path = tokenizer_file(job)
    if path is None:
        return 256, "the byte tokenizer"
    if job.data.tokenizer == "bpe" and not path.is_file():
        if job.model.vocab_size is None or job.model.vocab_size <= 256:
            raise ConfigError(
                f"data.tokenizer=bpe trains a BPE of model.vocab_size ids, and model.vocab_size="
                f"{job.model.vocab_size} is not above 256; set model.vocab_size (e.g. 4096)"
            )
        return job.model.vocab_size, "the BPE tokenizer to train"
    try:
        stat = path.stat()
    except OSError:
        raise ConfigError(
            f"data.tokenizer {str(path)!r}: no such tokenizer.json; use 'byte', 'bpe', or a file "
            "from `mla tokenizer train DATA --vocab-size N --out tokenizer.json`"
        ) from None
    return _vocab(str(path), stat.st_mtime_ns, stat.st_size), f"the tokenizer {path}"


@lru_cache(maxsize=16)
def _vocab(path: str, mtime_ns: int, size: int) -> int:
    from mla.tokenizer import load_tokenizer

    try:
        return load_tokenizer(path).vocab_size
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _digest(spec: str | None) -> str:
    from mla.tokenizer import load_tokenizer, tokenizer_digest

    try:
        return tokenizer_digest(load_tokenizer(spec))
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def ensure_run_tokenizer(job: JobConfig) -> Path | None:
    """For ``data.tokenizer=bpe``: train the BPE on the training split into
    ``RUN_DIR/tokenizer.json`` unless it is there (a resumed run keeps its own); returns the
    file, or ``None`` for other tokenizers.

    Raises:
        ConfigError: see :func:`tokenizer_vocab_size`.
        DataError: the corpus cannot be read.
    """
    path = tokenizer_file(job)
    if job.data.tokenizer != "bpe" or path is None or path.is_file():
        return None
    from mla.tokenizer import train_bpe
    from orchestrator.contract.io import atomic_write
    from workers.data import corpus_documents, split_documents

    vocab, _ = tokenizer_vocab_size(job)
    docs, source = corpus_documents(job.data.path)
    train_docs, _ = split_documents(docs, source, job.data.val_fraction)
    tok = train_bpe((d.read().decode("utf-8", errors="replace") for d in train_docs), vocab)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, tok.to_json())
    return path
