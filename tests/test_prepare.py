"""Tokenizers and prepared corpora (issue 18, items 1-3): a BPE tokenizer round-trips text, a
prepared folder gives exactly the batches of the unprepared path, a re-run is a no-op, a kill -9
during `mla prepare` never leaves a manifest that is read half-written, and a run on prepared
shards resumes (and resizes) with the losses of an uninterrupted run."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from mla.tokenizer import (
    ByteTokenizer,
    StreamDecoder,
    load_tokenizer,
    tokenizer_from_json,
    train_bpe,
)
from orchestrator.config import load_job_config
from orchestrator.contract.errors import ConfigError, DataError
from orchestrator.prepare import prepare_corpus
from workers.data import WindowBatches, load_corpus, stdlib_files
from workers.prepared import MANIFEST, is_prepared

TEXT = "naïve café — 日本語 déf f(x):\n\treturn  x ** 2  # ünïcödé\r\n\n\x7f"


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory) -> Path:
    """A folder of 40 standard-library files (train and validation by the name hash)."""
    root = tmp_path_factory.mktemp("corpus")
    for p in stdlib_files()[:40]:
        (root / p.name).write_bytes(p.read_bytes())
    return root


@pytest.fixture(scope="module")
def bpe_file(corpus_dir, tmp_path_factory) -> Path:
    from workers.data import corpus_documents, split_documents

    docs, source = corpus_documents(str(corpus_dir))
    train, _ = split_documents(docs, source, 0.05)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    path.write_text(train_bpe((d.read().decode() for d in train), 600).to_json())
    return path


def test_bpe_round_trips_text_and_its_file(bpe_file):
    tok = load_tokenizer(bpe_file)
    assert tok.kind == "bpe" and tok.vocab_size == 600
    ids = tok.encode(TEXT)
    assert tok.decode(ids) == TEXT and len(ids) < len(TEXT.encode())
    assert tokenizer_from_json(tok.to_json()).encode(TEXT) == ids  # what checkpoints store
    stream = StreamDecoder(tok)  # token by token, multi-byte characters held back
    assert "".join(stream.feed([i]) for i in ids) + stream.flush() == TEXT
    code = Path(stdlib_files()[100]).read_text()
    assert tok.decode(tok.encode(code)) == code
    with pytest.raises(ValueError, match="more than the 256 byte symbols"):
        train_bpe(["abc"], 100)


@pytest.mark.parametrize("kind", ["byte", "bpe"])
def test_prepared_corpus_gives_exactly_the_unprepared_batches(kind, corpus_dir, bpe_file, tmp_path):
    spec = "byte" if kind == "byte" else str(bpe_file)
    out = tmp_path / "prepared"
    result = prepare_corpus(str(corpus_dir), out, spec, 0.05, workers=0, shard_tokens=20_000)
    assert not result.skipped and len(result.manifest["splits"]["train"]["shards"]) > 2
    raw = load_corpus(str(corpus_dir), 0.05, load_tokenizer(spec))
    mapped = load_corpus(str(out))
    assert isinstance(mapped.train.shards[0], np.memmap)
    assert mapped.train.shards[0].dtype == np.uint16
    assert np.array_equal(np.asarray(mapped.train), raw.train)
    assert np.array_equal(np.asarray(mapped.val), raw.val) and mapped.val_bytes == raw.val_bytes
    a, b = WindowBatches(raw.train, 64, seed=7), WindowBatches(mapped.train, 64, seed=7)
    for step in (0, 3, 10_000):  # the last one is past the first epoch (reshuffled)
        for dp in (1, 2, 4):
            for r in range(dp):
                xa, ya = a.rank_slice(step, 16, r, dp)
                xb, yb = b.rank_slice(step, 16, r, dp)
                assert np.array_equal(xa, xb) and np.array_equal(ya, yb)
    # the ranks of a step together read the step's sequences, whatever the layout
    whole = b.rank_slice(5, 16, 0, 1)[0]
    assert np.array_equal(np.concatenate([b.rank_slice(5, 16, r, 4)[0] for r in range(4)]), whole)


def test_rerun_is_a_noop_and_a_changed_input_rebuilds(corpus_dir, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(corpus_dir, src)
    out = tmp_path / "prepared"
    prepare_corpus(str(src), out, workers=0)
    stamp = (out / MANIFEST).stat().st_mtime_ns
    again = prepare_corpus(str(src), out, workers=0)
    assert again.skipped and (out / MANIFEST).stat().st_mtime_ns == stamp
    first = sorted(src.iterdir())[0]
    first.write_text(first.read_text() + "\n# changed\n")
    rebuilt = prepare_corpus(str(src), out, workers=0)
    assert not rebuilt.skipped
    assert rebuilt.manifest["fingerprint"] != again.manifest["fingerprint"]
    assert np.array_equal(np.asarray(load_corpus(str(out)).train), load_corpus(str(src)).train)


def test_prepare_keeps_the_loader_errors_and_refuses_a_foreign_out(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        prepare_corpus(str(tmp_path / "nope.txt"), tmp_path / "o", workers=0)
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "a.txt").write_bytes(b"ab\x00cd")
    (tmp_path / "bin" / "b.txt").write_text("hello")
    with pytest.raises(DataError, match="looks binary"):
        prepare_corpus(str(tmp_path / "bin"), tmp_path / "o", workers=0)
    assert not (tmp_path / "o").exists()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    from mla.staged_dir import OutDirError

    with pytest.raises(OutDirError, match="not an `mla prepare` folder"):
        prepare_corpus(str(tmp_path / "bin" / "b.txt"), mine, workers=0)
    assert (mine / "notes.txt").read_text() == "keep me"


def test_vocab_size_follows_the_tokenizer_and_a_smaller_one_is_named(bpe_file):
    job = load_job_config("configs/tiny.yaml", [f"data.tokenizer={bpe_file}"])
    assert job.model_config_().vocab_size == 600
    bigger = load_job_config(
        "configs/tiny.yaml", [f"data.tokenizer={bpe_file}", "model.vocab_size=640"]
    )
    assert bigger.model_config_().vocab_size == 640  # padding is allowed
    small = load_job_config(
        "configs/tiny.yaml", [f"data.tokenizer={bpe_file}", "model.vocab_size=512"]
    )
    with pytest.raises(ConfigError, match=r"model.vocab_size=512 is smaller than the 600 ids"):
        small.model_config_()
    assert load_job_config("configs/tiny.yaml").model_config_().vocab_size == 256
    with pytest.raises(ConfigError, match="data.tokenizer=bpe trains a BPE of model.vocab_size"):
        load_job_config("configs/tiny.yaml", ["data.tokenizer=bpe"]).model_config_()


def test_bits_per_byte_divides_nats_by_utf8_bytes(bpe_file):
    import torch

    from workers.evaluation import EvalData, _target_bytes, evaluate

    tok = load_tokenizer(bpe_file)
    ids = np.array([tok.encode(TEXT * 4)[:33]])
    x, y = ids[:, :-1], ids[:, 1:]
    n_bytes = _target_bytes(y, tok)
    assert n_bytes == len(tok.token_bytes(y[0].tolist())) and n_bytes > y.size

    def uniform(inputs: torch.Tensor) -> torch.Tensor:  # ln(600) nats per token
        return torch.zeros(*inputs.shape, tok.vocab_size)

    result = evaluate(uniform, EvalData(x, y, "t", n_bytes))
    assert result["loss"] == pytest.approx(math.log(600))
    assert result["bits_per_byte"] == pytest.approx(y.size * math.log(600) / math.log(2) / n_bytes)
    byte = evaluate(uniform, EvalData(x, y, "t"))  # byte tokenizer: one byte a token
    assert byte["bits_per_byte"] == pytest.approx(math.log(600) / math.log(2))
    assert ByteTokenizer().token_bytes([104, 105]) == b"hi"


# ----------------------------------------------------------------------------- multi-process


def _prepare_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "orchestrator.cli", "prepare", *args]


@pytest.mark.slow
def test_kill_9_during_prepare_never_leaves_a_half_written_manifest(tmp_path):
    """SIGKILL `mla prepare` at several moments of writing: the folder is absent or complete
    (its manifest parses and every shard has the manifest's size), and a re-run finishes it."""
    src = tmp_path / "src"
    src.mkdir()
    for p in stdlib_files()[:400]:
        (src / p.name).write_bytes(p.read_bytes())
    out = tmp_path / "prepared"
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    for delay in (0.5, 1.0, 1.5, 2.0, 3.0):
        shutil.rmtree(out, ignore_errors=True)
        proc = subprocess.Popen(
            _prepare_cmd(str(src), "--out", str(out), "--workers", "0"), env=env
        )
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if is_prepared(out):
            corpus = load_corpus(str(out))  # validates every shard's size against the manifest
            assert (
                len(corpus.train)
                == json.loads((out / MANIFEST).read_text())["splits"]["train"]["tokens"]
            )
        else:
            assert not out.exists()  # only the .tmp- folder beside it, never read
    done = subprocess.run(_prepare_cmd(str(src), "--out", str(out), "--workers", "0"), env=env)
    assert done.returncode == 0 and is_prepared(out)
    assert np.array_equal(np.asarray(load_corpus(str(out)).train), load_corpus(str(src)).train)


@pytest.mark.slow
def test_ray_data_prepare_writes_the_single_process_shards(corpus_dir, bpe_file, tmp_path):
    """`mla prepare` on the embedded Ray (2 Ray Data workers) writes byte-identical shards."""
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    ray_out, local_out = tmp_path / "ray", tmp_path / "local"
    args = ["--tokenizer", str(bpe_file)]
    ran = subprocess.run(
        _prepare_cmd(str(corpus_dir), "--out", str(ray_out), "--workers", "2", *args),
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert ran.returncode == 0, ran.stderr[-3000:]
    prepare_corpus(str(corpus_dir), local_out, str(bpe_file), workers=0)
    files = sorted(p.name for p in local_out.iterdir())
    assert files == sorted(p.name for p in ray_out.iterdir())
    for name in files:
        assert (ray_out / name).read_bytes() == (local_out / name).read_bytes(), name
    again = subprocess.run(
        _prepare_cmd(str(corpus_dir), "--out", str(ray_out), "--workers", "2", *args),
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert again.returncode == 0 and "up to date, nothing written" in again.stderr


@pytest.mark.slow
def test_run_on_prepared_bpe_shards_resumes_and_resizes_with_the_same_losses(
    corpus_dir, bpe_file, tmp_path, mla_cli, fast_overrides
):
    """Uninterrupted 12 steps vs 6 + resume to 9 (same layout: identical losses) + resume to 12
    on one worker instead of two (elastic resize: the same sequences, losses within float
    reduction order); the checkpoint carries the BPE tokenizer, and `mla eval` uses it."""
    prepared = tmp_path / "prepared"
    prepare_corpus(str(corpus_dir), prepared, str(bpe_file), 0.25, workers=0)

    def train(name: str, steps: int, workers: int = 2) -> dict[int, float]:
        sets = [
            f"run.dir={tmp_path}",
            *fast_overrides,
            f"data.path={prepared}",
            "train.log_every=1",
            "train.eval_every=100",
            "checkpoint.every=3",
            "train.warmup_steps=2",  # then a constant lr (min_lr = lr): the schedule does not
            "train.min_lr=3e-3",  # depend on train.steps, so a 6-step run continues a 12-step one
            f"train.steps={steps}",
            f"run.name={name}",
            f"cluster.num_workers={workers}",
        ]
        ran = mla_cli("train", "configs/tiny.yaml", sets=sets, timeout=600)
        assert ran.returncode == 0, ran.stderr[-3000:]
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}

    whole = train("whole", 12)
    train("split", 6)
    resumed = train("split", 9)
    assert [resumed[s] for s in range(7, 10)] == [whole[s] for s in range(7, 10)]
    resized = train("split", 12, workers=1)
    assert [resized[s] for s in range(10, 13)] == pytest.approx(
        [whole[s] for s in range(10, 13)], abs=1e-4
    )
    ckpt = tmp_path / "split" / "checkpoints" / "step_0000012"
    assert (ckpt / "tokenizer.json").read_text() == bpe_file.read_text()
    assert json.loads((ckpt / "meta.json").read_text())["model"]["vocab_size"] == 600
    ran = mla_cli("eval", str(tmp_path / "split"), "--json")
    assert ran.returncode == 0, ran.stderr[-3000:]
    result = json.loads(ran.stdout)
    val = [json.loads(x) for x in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert result["loss"] == pytest.approx(
        [r for r in val if "val_loss" in r][-1]["val_loss"], abs=1e-4
    )
    assert result["bits_per_byte"] < result["loss"] / math.log(2)  # several bytes a BPE token


def test_generate_and_export_use_the_tokenizer_the_checkpoint_stores(bpe_file, tmp_path):
    """A checkpoint holding a BPE tokenizer.json: load_model returns it, `mla export` copies it,
    and the export loads back with the same tokenizer."""
    from mla.pretrained import save_pretrained
    from tests.checkpoint_fixture import write_run
    from workers.inference import load_model

    run, _ = write_run(tmp_path, vocab_size=600)
    ckpt = run / "checkpoints" / "step_0000010"
    shutil.copyfile(bpe_file, ckpt / "tokenizer.json")
    loaded = load_model(run)
    assert loaded.tokenizer.kind == "bpe" and loaded.tokenizer.encode(TEXT) == load_tokenizer(
        bpe_file
    ).encode(TEXT)
    out = save_pretrained(loaded.model, tmp_path / "export", tokenizer=loaded.tokenizer)
    assert (out / "tokenizer.json").read_text() == bpe_file.read_text()
    assert json.loads((out / "config.json").read_text())["tokenizer"]["type"] == "bpe"
    assert load_model(out).tokenizer.decode(load_model(out).tokenizer.encode(TEXT)) == TEXT
    (ckpt / "tokenizer.json").unlink()  # a checkpoint from before tokenizers were stored
    assert load_model(run).tokenizer.kind == "byte"


def test_bpe_is_trained_at_launch_once_and_a_prepared_folder_brings_its_own(
    corpus_dir, bpe_file, tmp_path
):
    from orchestrator.launcher import check_data

    sets = [f"data.path={corpus_dir}", f"run.dir={tmp_path}", "data.seq_len=32"]
    job = load_job_config(
        "configs/tiny.yaml", [*sets, "data.tokenizer=bpe", "model.vocab_size=300"]
    )
    assert "bpe tokenizer, 300 ids" in check_data(job)
    trained = job.run_dir / "tokenizer.json"
    stamp = trained.stat().st_mtime_ns
    check_data(job)  # a resumed run keeps the tokenizer it trained with
    assert trained.stat().st_mtime_ns == stamp and load_tokenizer(trained).vocab_size == 300
    assert job.model_config_().vocab_size == 300

    prepared = tmp_path / "prepared"
    prepare_corpus(str(corpus_dir), prepared, str(bpe_file), 0.25, workers=0)
    own = load_job_config("configs/tiny.yaml", [f"data.path={prepared}", "data.seq_len=32"])
    assert own.model_config_().vocab_size == 600 and "bpe tokenizer, 600 ids" in check_data(own)
    other = load_job_config(
        "configs/tiny.yaml", [f"data.path={prepared}", f"data.tokenizer={trained}"]
    )
    with pytest.raises(ConfigError, match="is not the tokenizer data.path"):
        other.model_config_()


def test_mla_compress_refuses_a_bpe_model_before_any_work(bpe_file, tmp_path):
    """`mla compress` and its ONNX runner read byte tokens: a BPE run is refused, nothing written."""
    from tests.checkpoint_fixture import write_run

    run, _ = write_run(tmp_path, vocab_size=600)
    shutil.copyfile(bpe_file, run / "checkpoints" / "step_0000010" / "tokenizer.json")
    out = tmp_path / "small"
    cmd = [sys.executable, "-m", "orchestrator.cli", "compress", str(run), "--out", str(out)]
    result = subprocess.run([*cmd, "--target-mb", "1"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "trained with a bpe tokenizer" in " ".join(result.stderr.split())
    assert not out.exists()


def _mla(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "orchestrator.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def test_prepare_and_tokenizer_train_refuse_bad_inputs_with_one_message(corpus_dir, tmp_path):
    """Found by a new user: each exits 2, names what is wrong and leaves files as they were."""
    prepared = tmp_path / "prepared"
    prepare_corpus(str(corpus_dir), prepared, "byte", 0.05, 0)
    binary = tmp_path / "tok.bin"
    binary.write_bytes(b"\x00\xaa\xff")
    mine = tmp_path / "notes.txt"
    mine.write_text("mine")
    cases = [
        (
            ("prepare", str(prepared), "--out", str(tmp_path / "p2"), "--workers", "0"),
            "is already an `mla prepare` folder",
        ),
        (
            ("tokenizer", "train", str(corpus_dir), "--vocab-size", "300", "--out", "/proc/x"),
            "--out /proc/x: cannot write it",
        ),
        (
            (
                "prepare",
                str(corpus_dir),
                "--out",
                str(tmp_path / "p3"),
                "--tokenizer",
                str(binary),
                "--workers",
                "0",
            ),
            "not a tokenizer.json (byte 1 is not UTF-8 text)",
        ),
        (
            (
                "prepare",
                str(corpus_dir),
                "--out",
                str(tmp_path / "p4"),
                "--tokenizer",
                "bpe",
                "--workers",
                "0",
            ),
            "'bpe' is trained by `mla train` at launch",
        ),
        (
            ("tokenizer", "train", str(corpus_dir), "--vocab-size", "300", "--out", str(mine)),
            "exists and is not a tokenizer.json; it is left untouched",
        ),
        (
            ("tokenizer", "train", str(tmp_path / "nope"), "--vocab-size", "300", "--out", "t"),
            f"DATA '{tmp_path / 'nope'}' does not exist",
        ),
    ]
    for args, words in cases:
        result = _mla(*args)
        assert result.returncode == 2 and "Traceback" not in result.stderr, (args, result.stderr)
        assert words in " ".join(result.stderr.split()), (args, result.stderr)
    assert mine.read_text() == "mine"
    assert not any((tmp_path / p).exists() for p in ("p2", "p3", "p4"))
