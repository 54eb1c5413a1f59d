"""Export to safetensors and back: bit-exact tensors, identical logits, atomic writes, clear errors."""

import json
import os
import shutil
import stat

import pytest
import torch
from safetensors.torch import load_file

import mla
from mla.pretrained import save_pretrained
from mla.staged_dir import OutDirError
from orchestrator.contract.errors import CheckpointError
from tests.checkpoint_fixture import write_run
from workers.inference import load_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_checkpoint_export_load_pretrained_gives_identical_logits(tmp_path):
    run, model = write_run(tmp_path, n_kv_heads=2)
    loaded = load_model(run)
    out = save_pretrained(
        loaded.model, tmp_path / "export", source={"checkpoint": str(loaded.checkpoint), "step": 10}
    )
    back = mla.load_pretrained(out)
    tensors = load_file(str(out / "model.safetensors"))
    assert set(tensors) == {n for n, _ in model.named_parameters()}
    assert all(torch.equal(tensors[n], p) for n, p in model.named_parameters())
    tokens = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(0))
    assert torch.equal(back(tokens), model(tokens))
    config = json.loads((out / "config.json").read_text())
    assert config["model"]["n_kv_heads"] == 2 and config["tokenizer"]["type"] == "bytes"
    assert "load_pretrained" in (out / "README.md").read_text()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_export_refuses_an_existing_folder_unless_overwrite(tmp_path):
    _, model = write_run(tmp_path)
    out = save_pretrained(model, tmp_path / "export")
    with pytest.raises(OutDirError, match="--overwrite"):
        save_pretrained(model, out)
    save_pretrained(model, out, overwrite=True)
    assert mla.load_pretrained(out) is not None


def test_export_never_replaces_a_file_and_names_an_unusable_parent(tmp_path):
    _, model = write_run(tmp_path)
    keep = tmp_path / "notes.md"
    keep.write_text("mine")
    with pytest.raises(OutDirError, match="is a file, not a folder"):
        save_pretrained(model, keep, overwrite=True)
    assert keep.read_text() == "mine"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    with pytest.raises(OutDirError, match="cannot create a folder in /proc"):
        save_pretrained(model, "/proc/mla-export")


def test_export_is_readable_as_the_umask_allows(tmp_path):
    _, model = write_run(tmp_path)
    out = save_pretrained(model, tmp_path / "export")
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~mask
    assert stat.S_IMODE((out / "model.safetensors").stat().st_mode) == 0o666 & ~mask


def test_failed_export_leaves_no_folder(tmp_path, monkeypatch):
    _, model = write_run(tmp_path)
    import safetensors.torch

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(OSError):
        save_pretrained(model, tmp_path / "export")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_unfinished_and_corrupt_checkpoints_are_refused_with_the_reason(tmp_path):
    run, _ = write_run(tmp_path)
    ckpt = run / "checkpoints" / "step_0000010"
    stage = ckpt / "consolidated" / "stage_000.pt"
    stage.write_bytes(stage.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="stage_000.pt has 1000 bytes, the manifest says"):
        load_model(run)
    (ckpt / "meta.json").unlink()
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        load_model(run)
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        load_model(ckpt)
    tmp = ckpt.rename(ckpt.with_name(".tmp-step_0000010"))
    with pytest.raises(CheckpointError, match="did not finish"):
        load_model(tmp)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "nowhere")


def test_a_corrupt_newest_checkpoint_is_passed_over_and_named(tmp_path):
    run, _ = write_run(tmp_path)
    good = run / "checkpoints" / "step_0000010"
    newer = good.with_name("step_0000020")
    shutil.copytree(good, newer)
    stage = newer / "consolidated" / "stage_000.pt"
    stage.write_bytes(b"")
    loaded = load_model(run)
    assert loaded.checkpoint == good
    assert len(loaded.skipped) == 1 and loaded.skipped[0].startswith("step_0000020: ")
    assert "stage_000.pt" in loaded.skipped[0]
    assert load_model(good).skipped == ()
