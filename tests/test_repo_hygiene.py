"""The tracked tree holds no unresolved merge-conflict markers (one was committed once, in the
README and a module docstring, where no other test looks)."""

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MARKERS = ("<<<<<<< ", ">>>>>>> ")


def test_no_tracked_file_holds_a_merge_conflict_marker():
    files = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True
    ).stdout.split(b"\0")
    bad = []
    for name in filter(None, files):
        path = ROOT / name.decode()
        if not path.is_file() or path.stat().st_size > 2_000_000:
            continue
        for i, line in enumerate(path.read_bytes().splitlines(), 1):
            if line.startswith(tuple(m.encode() for m in MARKERS)) or line == b"=======":
                bad.append(f"{name.decode()}:{i}")
    assert not bad, f"merge-conflict markers at {bad}"
