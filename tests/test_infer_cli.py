"""`mla generate`, `mla eval`, `mla export` on a run folder in the training format: output, and one
clear message with exit status 2 for every bad input."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.checkpoint_fixture import write_run

MLA = [sys.executable, "-m", "orchestrator.cli"]


def mla(*args: str) -> subprocess.CompletedProcess:
    """Run the CLI; ``stderr`` comes back with rich's line wrapping undone."""
    result = subprocess.run([*MLA, *map(str, args)], capture_output=True, text=True, timeout=120)
    result.stderr = " ".join(result.stderr.split())
    return result


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("infer")
    text = root / "corpus.txt"
    text.write_text("def add(a, b):\n    return a + b\n" * 40)
    run, model = write_run(root, data_path=str(text))
    return run, model, text


def test_generate_streams_text_and_is_reproducible(run):
    path, _, _ = run
    args = (
        "generate",
        path,
        "--prompt",
        "def ",
        "--max-new-tokens",
        30,
        "--seed",
        3,
        "--top-k",
        20,
    )
    a, b = mla(*args), mla(*args)
    assert a.returncode == 0, a.stderr
    assert (
        a.stdout.startswith("def ")
        and len(a.stdout.encode()) > len("def ")
        and a.stdout == b.stdout
    )


def test_generate_batch_of_prompts_from_a_jsonl_file_as_json(run, tmp_path):
    path, _, _ = run
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "import "}\n{"prompt": "class A:"}\n')
    result = mla(
        "generate",
        path,
        "--prompt-file",
        prompts,
        "--max-new-tokens",
        5,
        "--json",
        "--temperature",
        0,
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert [o["prompt"] for o in out] == ["import ", "class A:"] and all(
        o["new_tokens"] == 5 for o in out
    )


def test_eval_json_is_the_mean_token_cross_entropy_of_the_windows(run):
    path, model, text = run
    result = mla("eval", path, "--json", "--data", text, "--split", "all", "--seq-len", 32)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    data = np.frombuffer(text.read_bytes(), dtype=np.uint8).astype(np.int64)
    n = (len(data) - 1) // 32
    x = torch.from_numpy(data[: n * 32].reshape(n, 32))
    y = torch.from_numpy(data[1 : n * 32 + 1].reshape(n, 32))
    with torch.no_grad():
        loss = float(F.cross_entropy(model(x).flatten(0, 1), y.flatten()))
    assert report["windows"] == n and abs(report["loss"] - loss) < 1e-5
    assert math.isclose(report["bits_per_byte"], report["loss"] / math.log(2))
    assert math.isclose(report["perplexity"], math.exp(report["loss"]))


def test_export_then_generate_from_the_export(run, tmp_path):
    path, _, _ = run
    out = tmp_path / "exported"
    assert mla("export", path, "--out", out).returncode == 0
    a = mla("generate", path, "--prompt", "x", "--max-new-tokens", 8, "--temperature", 0)
    b = mla("generate", out, "--prompt", "x", "--max-new-tokens", 8, "--temperature", 0)
    assert a.returncode == b.returncode == 0 and a.stdout == b.stdout
    again = mla("export", path, "--out", out)
    assert again.returncode == 2 and "--overwrite" in again.stderr
    notes = tmp_path / "notes.md"
    notes.write_text("mine")
    onto_file = mla("export", path, "--out", notes, "--overwrite")
    assert onto_file.returncode == 2 and "is a file, not a folder" in onto_file.stderr
    assert notes.read_text() == "mine" and not list(tmp_path.glob(".old-*"))
    unusable = mla("export", path, "--out", "/proc/mla-export")
    assert unusable.returncode == 2 and "Traceback" not in unusable.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (("--prompt", ""), "prompt 1 is empty"),
        (("--prompt", "x" * 65), "prompt 1 has 65 tokens, more than the model's max_seq_len (64)"),
        (("--prompt", "x", "--top-p", "0"), "--top-p=0.0 must be in (0, 1]"),
        (("--prompt", "x", "--top-p", "1.5"), "--top-p=1.5 must be in (0, 1]"),
        (
            ("--prompt", "x", "--temperature", "-1"),
            "--temperature=-1.0 must be a finite number >= 0",
        ),
        (
            ("--prompt", "x", "--temperature", "inf"),
            "--temperature=inf must be a finite number >= 0",
        ),
        (
            ("--prompt", "x", "--temperature", "nan"),
            "--temperature=nan must be a finite number >= 0",
        ),
        ((), "no prompt given"),
    ],
)
def test_generate_bad_input_exits_2_with_one_message(run, args, message):
    path, _, _ = run
    result = mla("generate", path, *args)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_a_binary_prompt_file_is_refused_naming_the_byte(run, tmp_path):
    path, _, _ = run
    binary = tmp_path / "prompt.bin"
    binary.write_bytes(b"def f():\n\xff\xfe\x00")
    result = mla("generate", path, "--prompt-file", binary)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "is not UTF-8 text (byte 9 is not valid UTF-8)" in " ".join(result.stderr.split())


def test_missing_and_half_written_checkpoints_exit_2(tmp_path):
    missing = mla("generate", tmp_path / "nope", "--prompt", "x")
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    run, _ = write_run(tmp_path)
    ckpt = run / "checkpoints" / "step_0000010"
    (ckpt / "meta.json").unlink()
    half = mla("eval", run)
    assert (
        half.returncode == 2
        and "no complete checkpoint" in half.stderr
        and "Traceback" not in half.stderr
    )


def test_eval_refuses_a_sequence_longer_than_the_model_allows(run):
    path, _, text = run
    result = mla("eval", path, "--data", text, "--seq-len", 65)
    assert (
        result.returncode == 2
        and "--seq-len=65 is longer than the model allows (max_seq_len=64" in result.stderr
    )


@pytest.mark.parametrize("seq_len", [0, 1])
def test_eval_refuses_a_window_shorter_than_two_tokens(run, seq_len):
    path, _, text = run
    result = mla("eval", path, "--data", text, "--seq-len", seq_len)
    assert result.returncode == 2 and f"--seq-len={seq_len}: a window needs at least 2" in (
        result.stderr
    )
    assert "Traceback" not in result.stderr


def test_generate_past_max_seq_len_says_it_was_capped(run):
    path, _, _ = run
    args = ("generate", path, "--prompt", "abcd", "--temperature", 0, "--json")
    capped = mla(*args, "--max-new-tokens", 2000)
    assert capped.returncode == 0, capped.stderr
    assert "--max-new-tokens 2000 capped at 61" in capped.stderr and "max_seq_len (64" in (
        capped.stderr
    )
    assert json.loads(capped.stdout)[0]["new_tokens"] == 61
    within = mla(*args, "--max-new-tokens", 61)
    assert within.returncode == 0 and "capped" not in within.stderr


def test_eval_names_a_validation_split_too_short_for_the_run_s_windows(tmp_path):
    """The run's evaluation cycles a short validation split; `mla eval` reproduces it and says so."""
    from workers.evaluation import eval_windows

    text = tmp_path / "corpus.txt"
    text.write_text("x = 1\n" * 30)  # 180 bytes, val half: 90 bytes = 2 windows of 32 tokens
    job = {
        "data": {"path": str(text), "val_fraction": 0.5, "seq_len": 32},
        "train": {"seed": 3, "global_batch": 4, "eval_batches": 2},
    }
    short = eval_windows(job, None, None, "val", None)
    assert len(short.inputs) == 4 and "only 2 distinct windows" in short.description
    job["train"]["global_batch"] = 2
    enough = eval_windows(job, None, None, "val", None)
    assert len(enough.inputs) == 2 and "distinct" not in enough.description
