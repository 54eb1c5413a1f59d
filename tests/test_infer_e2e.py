"""End to end: a run trained by `mla train` (2 DeepSpeed workers under an embedded Ray) is
evaluated by `mla eval` to its own last validation loss, generates text, and exports to a folder
whose model gives the same logits as the checkpoint."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.slow
MLA = [sys.executable, "-m", "orchestrator.cli"]
FAST = [
    "data.seq_len=64",
    "train.micro_batch=4",
    "train.global_batch=16",
    "train.warmup_steps=5",
    "train.log_every=5",
    "train.eval_every=10",
    "train.eval_batches=3",
    "checkpoint.every=20",
    "train.steps=20",
]


def test_trained_run_evaluates_to_its_last_val_loss_generates_and_exports(tmp_path):
    sets = [f"run.dir={tmp_path}", "run.name=infer", *FAST]
    train = subprocess.run(
        [*MLA, "train", "configs/tiny.yaml", *[a for s in sets for a in ("--set", s)]],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert train.returncode == 0, train.stderr[-3000:]
    run = tmp_path / "infer"
    last_val = json.loads((run / "summary.json").read_text())["last_val_loss"]

    ev = subprocess.run(
        [*MLA, "eval", str(run), "--json"], capture_output=True, text=True, timeout=300
    )
    assert ev.returncode == 0, ev.stderr
    assert abs(json.loads(ev.stdout)["loss"] - last_val) < 1e-4

    gen = subprocess.run(
        [*MLA, "generate", str(run), "--prompt", "def ", "--max-new-tokens", "40", "--seed", "1"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert gen.returncode == 0 and gen.stdout.startswith("def ") and len(gen.stdout) > 10, (
        gen.stderr
    )

    out = tmp_path / "export"
    exp = subprocess.run(
        [*MLA, "export", str(run), "--out", str(out)], capture_output=True, text=True, timeout=300
    )
    assert exp.returncode == 0, exp.stderr
    import mla
    from workers.inference import load_model

    tokens = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(mla.load_pretrained(out)(tokens), load_model(run).model(tokens))
