"""Checkpoints prove they are complete: a manifest of sizes and SHA-256s written last; resume
takes the newest checkpoint that verifies and says which newer ones it rejected and why."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from orchestrator.contract.checkpoints import (
    MANIFEST,
    complete_checkpoints,
    find_resumable,
    remove_stale_temporaries,
    set_aside,
    verify_checkpoint,
)
from workers.checkpoint import load_checkpoint, save_checkpoint


class FakeEngine:
    """Writes a small 'model' file, as the real engine writes its tensors."""

    def save_checkpoint(self, path, tag, client_state=None, save_latest=False):
        folder = Path(path) / tag
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "stage_000.pt").write_bytes(b"weights" * 100)
        (folder / "state.json").write_text(json.dumps(client_state))

    def load_checkpoint(self, path, tag):
        data = (Path(path) / tag / "stage_000.pt").read_bytes()
        if not data:
            raise EOFError("Ran out of input")
        return path, {}


def _save(run_dir: Path, step: int, keep: int = 5) -> Path:
    return save_checkpoint(
        FakeEngine(), run_dir, step, {"layout": {"dp": 1}}, 0, keep, lambda: None
    )


def test_manifest_is_written_and_verifies(tmp_path):
    path = _save(tmp_path, 10)
    manifest = json.loads((path / MANIFEST).read_text())
    assert set(manifest["files"]) == {
        "meta.json",
        "consolidated/stage_000.pt",
        "consolidated/state.json",
    }
    assert manifest["files"]["consolidated/stage_000.pt"]["bytes"] == 700
    assert verify_checkpoint(path) is None


def test_zero_byte_file_in_the_newest_checkpoint_falls_back_to_the_older_one(tmp_path):
    _save(tmp_path, 10)
    newest = _save(tmp_path, 20)
    (newest / "consolidated" / "stage_000.pt").write_bytes(b"")  # crash during a write / full disk
    found, rejected = find_resumable(tmp_path)
    assert found[0] == 10
    assert rejected == [(newest, "consolidated/stage_000.pt has 0 bytes, the manifest says 700")]


def test_flipped_byte_zero_byte_meta_and_missing_manifest_are_rejected(tmp_path):
    a, b, c = _save(tmp_path, 10), _save(tmp_path, 20), _save(tmp_path, 30)
    data = bytearray((a / "consolidated" / "stage_000.pt").read_bytes())
    data[0] ^= 1
    (a / "consolidated" / "stage_000.pt").write_bytes(bytes(data))
    (b / "meta.json").write_text("")
    (c / MANIFEST).unlink()
    found, rejected = find_resumable(tmp_path)
    assert found is None
    reasons = dict(rejected)
    assert "no manifest.json" in reasons[c]
    assert "meta.json has 0 bytes" in reasons[b]
    assert "SHA-256" in reasons[a]


def test_corrupt_manifest_is_a_reason_not_a_traceback(tmp_path):
    path = _save(tmp_path, 10)
    (path / MANIFEST).write_text("{not json")
    assert "unreadable manifest.json" in verify_checkpoint(path)


def test_stale_temporary_folders_of_any_step_are_removed(tmp_path):
    _save(tmp_path, 10)
    for name in (".tmp-step_0000005", ".tmp-step_0000040"):
        (tmp_path / "checkpoints" / name / "consolidated").mkdir(parents=True)
    removed = remove_stale_temporaries(tmp_path)
    assert sorted(p.name for p in removed) == [".tmp-step_0000005", ".tmp-step_0000040"]
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_0000010"]


def test_a_rejected_checkpoint_is_set_aside_so_retention_keeps_the_good_one(tmp_path):
    _save(tmp_path, 10)
    bad = _save(tmp_path, 20)
    (bad / "meta.json").write_text("")
    set_aside(bad)
    _save(tmp_path, 15, keep=1)  # resumed from 10, saved 15: 15 is the newest complete one
    assert [s for s, _ in complete_checkpoints(tmp_path)] == [15]
    assert (tmp_path / "checkpoints" / "rejected-step_0000020").is_dir()


def test_unloadable_checkpoint_is_a_runtime_error_with_the_fix(tmp_path):
    path = _save(tmp_path, 10)
    (path / "consolidated" / "stage_000.pt").write_bytes(b"")
    with pytest.raises(RuntimeError, match="move it aside"):
        load_checkpoint(FakeEngine(), path)


def test_driver_resume_check_reports_rejected_checkpoints_without_a_traceback(tmp_path, capsys):
    from orchestrator.config import JobConfig
    from orchestrator.layouts import build_run_plan, check_resumable

    job = JobConfig(run={"dir": str(tmp_path), "name": "r"})
    run_dir = tmp_path / "r"
    good = _save(run_dir, 10)
    meta = json.loads((good / "meta.json").read_text())
    bad = _save(run_dir, 20)
    (bad / "meta.json").write_text("")  # the JSONDecodeError of the issue
    check_resumable(job, build_run_plan(job))
    err = capsys.readouterr().err
    assert (
        "step_0000020 rejected: meta.json has 0 bytes" in err
        and "resuming from step_0000010" in err
    )
    assert meta["step"] == 10
