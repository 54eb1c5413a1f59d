"""``mla prepare`` and ``mla tokenizer train``: corpora tokenized once, BPE tokenizers trained.

* ``mla tokenizer train DATA --vocab-size N --out tokenizer.json``: a byte-level BPE tokenizer
  (HF ``tokenizers``) trained on the training split of DATA only (:func:`mla.tokenizer.train_bpe`);
* ``mla prepare DATA --out DIR [--tokenizer byte|tokenizer.json] [--address ADDR]``: token shards
  and a manifest (:mod:`orchestrator.prepare`), tokenized by Ray Data on an embedded local Ray
  (127.0.0.1, ``--workers`` CPUs) or on the cluster at ``--address``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from orchestrator.cli_common import err
from orchestrator.contract.errors import ConfigError

app = typer.Typer()
tokenizer_app = typer.Typer(
    name="tokenizer", no_args_is_help=True, help="Train tokenizers (byte-level BPE)."
)
app.add_typer(tokenizer_app)

DataArg = typer.Argument(
    ...,
    help="Text file, folder, .jsonl (field 'text') or .parquet (column 'text'); 'stdlib' "
    "for the Python standard library sources.",
)
ValFraction = typer.Option(
    0.05, "--val-fraction", help="Share of documents held out (data.val_fraction)."
)


def _data_path(data: str) -> str | None:
    """DATA as ``data.path`` (``None`` for the standard library); a prepared folder is refused."""
    from workers.prepared import is_prepared

    if data != "stdlib" and not Path(data).expanduser().exists():
        raise ConfigError(
            f"DATA {data!r} does not exist; give a text file, a folder of text files, a .jsonl "
            "or a .parquet file, or stdlib for the Python standard library sources"
        )
    if data != "stdlib" and is_prepared(Path(data).expanduser()):
        raise ConfigError(
            f"DATA {data} is already an `mla prepare` folder (it holds manifest.json); use it "
            "as data.path directly, or pass the original text"
        )
    return None if data == "stdlib" else data


@tokenizer_app.command("train")
def tokenizer_train(
    data: str = DataArg,
    vocab_size: int = typer.Option(..., "--vocab-size", help="Vocabulary size (> 256)."),
    out_path: Path = typer.Option(..., "--out", help="tokenizer.json to write."),
    val_fraction: float = ValFraction,
) -> None:
    """Train a byte-level BPE tokenizer on the training split of DATA (never the validation
    split), written atomically as a Hugging Face tokenizer.json."""
    from mla.tokenizer import train_bpe
    from orchestrator.contract.io import atomic_write
    from workers.data import corpus_documents, split_documents

    if out_path.is_dir():
        raise ConfigError(f"--out {out_path} is a folder; give a file path such as tokenizer.json")
    _check_replaceable(out_path)
    docs, source = corpus_documents(_data_path(data))
    train_docs, _ = split_documents(docs, source, val_fraction)
    texts = (d.read().decode("utf-8", errors="replace") for d in train_docs)
    try:
        tok = train_bpe(texts, vocab_size)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    try:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(out_path, tok.to_json())
    except OSError as exc:
        raise ConfigError(
            f"--out {out_path}: cannot write it ({exc.strerror or exc}); choose a writable path"
        ) from None
    short = (
        f" (asked for {vocab_size:,}: BPE training on this corpus found no more merges)"
        if tok.vocab_size < vocab_size
        else ""
    )
    err.print(
        f"wrote {out_path}: BPE, vocab {tok.vocab_size}{short}, trained on {len(train_docs)} "
        f"training documents of {source}"
    )


def _check_replaceable(out_path: Path) -> None:
    """An existing ``--out`` is replaced only when it is a tokenizer file itself."""
    from mla.tokenizer import load_tokenizer

    if not out_path.is_file():
        return
    try:
        load_tokenizer(out_path)
    except ValueError:
        raise ConfigError(
            f"--out {out_path} exists and is not a tokenizer.json; it is left untouched: give "
            "a new path, or delete the file first"
        ) from None


@app.command("prepare")
def prepare(
    data: str = DataArg,
    out_dir: Path = typer.Option(
        ..., "--out", help="Prepared folder to write (data.path of runs)."
    ),
    tokenizer: str = typer.Option("byte", "--tokenizer", help="'byte' or a tokenizer.json path."),
    address: Optional[str] = typer.Option(
        None, "--address", help="Ray cluster to tokenize on; unset starts an embedded local Ray."
    ),
    workers: int = typer.Option(
        2,
        "--workers",
        min=0,
        help="Ray Data tasks at once (CPUs of the local Ray); 0 = this process.",
    ),
    val_fraction: float = ValFraction,
    json_out: bool = typer.Option(False, "--json", help="Print the manifest as JSON."),
) -> None:
    """Tokenize DATA once into memory-mapped token shards plus a manifest; a re-run on unchanged
    input does nothing."""
    from mla.staged_dir import OutDirError
    from orchestrator.prepare import _json, describe, prepare_corpus

    try:
        result = prepare_corpus(
            _data_path(data),
            out_dir,
            tokenizer,
            val_fraction,
            workers,
            ray_session=lambda: _ray(address, workers),
        )
    except OutDirError as exc:
        raise ConfigError(str(exc)) from None
    err.print(describe(result))
    if json_out:
        print(_json(result))  # plain print: rich would fold long lines


def _ray(address: str | None, workers: int):
    """The Ray session: ``address``, or an embedded one with ``workers`` CPUs and a 128 MiB
    object store, bound to 127.0.0.1 and stopped afterwards."""
    from orchestrator.config import validate_job_dict
    from orchestrator.launcher import ray_session

    job = validate_job_dict(
        {"cluster": {"address": address, "ray_num_cpus": workers, "object_store_mb": 128}}
    )
    return ray_session(job)
