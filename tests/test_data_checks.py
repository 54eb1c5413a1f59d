"""Binary-looking data is refused with the file named; a corpus smaller than one global batch warns."""

from __future__ import annotations

import os

import pytest

from orchestrator.contract.errors import DataError
from workers.data import load_corpus


def test_binary_file_is_refused_naming_it(tmp_path):
    path = tmp_path / "blob.txt"
    path.write_bytes(os.urandom(4096).replace(b"\x00", b"\x01"))  # random bytes: ~70% invalid UTF-8
    with pytest.raises(
        DataError, match=r"blob.txt: looks binary \(\d+% of it is not valid UTF-8\)"
    ):
        load_corpus(str(path))


def test_nul_bytes_in_a_folder_file_are_refused_naming_it(tmp_path):
    (tmp_path / "a.txt").write_text("hello world " * 100)
    (tmp_path / "b.txt").write_bytes(b"abc\x00def" * 100)
    with pytest.raises(DataError, match="b.txt: looks binary .*NUL"):
        load_corpus(str(tmp_path))


def test_text_with_a_few_invalid_bytes_is_still_text(tmp_path):
    path = tmp_path / "t.txt"
    path.write_bytes("caf\u00e9 ".encode() * 500 + b"\xff")
    assert len(load_corpus(str(path)).train) > 0


def test_fewer_windows_than_a_global_batch_warns(capsys):
    from orchestrator.launcher import warn_small_corpus

    assert warn_small_corpus(10 * 64 + 1, 100 * 64, 64, 32)[0].startswith(
        "warning: the train split holds 10 windows"
    )
    assert "fewer than one global batch" in " ".join(capsys.readouterr().err.split())
    assert warn_small_corpus(100 * 64, 100 * 64, 64, 32) == []
