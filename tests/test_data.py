"""Corpus loading, bad-data errors and layout-independent, disjoint data-parallel shards."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from orchestrator.contract.errors import DataError
from workers.data import WindowBatches, check_corpus, load_corpus, stdlib_files


def test_stdlib_corpus_excludes_tests_and_is_deterministic():
    files = stdlib_files()
    assert len(files) > 100
    assert not any("test" in p.parts or "site-packages" in p.parts for p in files)
    a, b = load_corpus(None), load_corpus(None)
    assert len(a.train) > 1_000_000 and len(a.val) > 10_000
    assert np.array_equal(a.train, b.train) and np.array_equal(a.val, b.val)
    assert a.train.dtype == np.uint8


def test_text_folder_jsonl_and_parquet(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    for i in range(20):
        (folder / f"{i}.txt").write_text(f"document {i} " * 50)
    corpus = load_corpus(str(folder), val_fraction=0.2)
    assert corpus.n_docs == 20 and len(corpus.val) > 0

    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": f"row {i} " * 30}) for i in range(10)))
    assert load_corpus(str(jsonl)).n_docs == 10

    parquet = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": [f"row {i} " * 30 for i in range(10)]}), parquet)
    corpus = load_corpus(str(parquet))
    assert corpus.n_docs == 10 and bytes(corpus.train[:5]) in (b"row 0", b"row 1", b"row 2")


def test_single_text_file_is_split_by_position(tmp_path):
    f = tmp_path / "book.txt"
    f.write_text("a" * 900 + "b" * 100)
    corpus = load_corpus(str(f), val_fraction=0.1)
    assert bytes(corpus.train) == b"a" * 900 and bytes(corpus.val) == b"b" * 100


def test_missing_path_names_the_path():
    with pytest.raises(DataError, match=r"data.path '/no/such/file.txt' does not exist"):
        load_corpus("/no/such/file.txt")


def test_jsonl_line_without_text_names_file_and_line(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"text": "ok"}\n{"content": "no text"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: line has no string 'text' field"):
        load_corpus(str(f))


def test_parquet_without_text_column(tmp_path):
    f = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"body": ["x"]}), f)
    with pytest.raises(DataError, match="no 'text' column"):
        load_corpus(str(f))


def test_empty_corpus_and_short_file(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="corpus is empty"):
        load_corpus(str(empty))
    short = tmp_path / "short.txt"
    short.write_text("x" * 100)
    with pytest.raises(DataError, match=r"shorter than one sequence \(data.seq_len \+ 1 = 129\)"):
        check_corpus(load_corpus(str(short)), seq_len=128)


def test_ranks_read_disjoint_slices_that_together_form_the_global_batch():
    tokens = np.random.default_rng(0).integers(0, 256, 50_000).astype(np.uint8)
    batches = WindowBatches(tokens, seq_len=16, seed=3)
    full_x, _ = batches.rank_slice(step=5, global_batch=8, dp_rank=0, dp=1)
    parts = [batches.rank_slice(step=5, global_batch=8, dp_rank=r, dp=4)[0] for r in range(4)]
    assert np.array_equal(np.concatenate(parts), full_x)  # same sequences whatever dp is
    rows = {row.tobytes() for part in parts for row in part}
    assert len(rows) == 8  # disjoint


def test_order_is_reproducible_from_the_seed_and_changes_with_it():
    tokens = (np.arange(20_000) % 251).astype(np.uint8)
    a = WindowBatches(tokens, 16, seed=1).rank_slice(0, 4, 0, 1)[0]
    b = WindowBatches(tokens, 16, seed=1).rank_slice(0, 4, 0, 1)[0]
    c = WindowBatches(tokens, 16, seed=2).rank_slice(0, 4, 0, 1)[0]
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_targets_are_inputs_shifted_by_one_and_epochs_wrap():
    tokens = np.arange(200, dtype=np.int64) % 256
    batches = WindowBatches(tokens, seq_len=10, seed=0)
    x, y = batches.windows(np.arange(batches.n_windows * 2 + 3))  # past two epochs
    assert np.array_equal(x[:, 1:], y[:, :-1])
    assert np.array_equal(y[:, -1], x[:, -1] + 1)
