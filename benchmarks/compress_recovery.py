"""`mla compress` recovery in process vs through the Ray Train trainer, side by side.

One tiny teacher (the compression tests' fixture: dense attention, d_model 64, 2 layers, trained
``--teacher-steps`` AdamW steps on the default corpus) is compressed twice to the same forced
shape (``--ffn-keep``/``--groups-keep``) with the same ``--steps`` of distillation, once with the
default in-process loop and once with ``--recovery ray --workers 1`` (embedded Ray, one
DeepSpeed worker). It prints the validation loss of the pruned weights before recovery, of each
recovered model (the report's ``distilled_val_loss``, same validation windows) and the wall time
of each whole ``mla compress`` and of its distillation stage.

Run: ``python -m benchmarks.compress_recovery [--steps 40] [--json]``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _teacher(folder: Path, steps: int) -> Path:
    import torch

    from mla.pretrained import save_pretrained
    from tests.compress_fixture import train_tiny

    torch.set_num_threads(1)
    model = train_tiny(steps=steps, attention="dense", d_model=64, ffn_hidden=128)
    return save_pretrained(model, folder / "teacher")


def _compress(teacher: Path, out: Path, args, recovery: str) -> dict:
    cmd = [sys.executable, "-m", "orchestrator.cli", "compress", str(teacher), "--out", str(out)]
    cmd += ["--ffn-keep", str(args.ffn_keep), "--groups-keep", str(args.groups_keep)]
    cmd += ["--steps", str(args.steps), "--val-windows", "16", "--candidates", "1"]
    cmd += ["--precision", "fp32", "--recovery", recovery, "--json"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    started = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    wall = time.perf_counter() - started
    if done.returncode:
        raise SystemExit(f"mla compress --recovery {recovery} failed:\n{done.stderr[-3000:]}")
    row = json.loads(done.stdout)["distilled"][0]
    return {
        "recovery": recovery,
        "pruned_val_loss": row["masked_val_loss"],
        "recovered_val_loss": row["distilled_val_loss"],
        "final_kl": row["final_kl"],
        "wall_s": wall,
        "distil_stage_s": _stage_seconds(done.stderr),
    }


def _stage_seconds(stderr: str) -> float | None:
    for line in stderr.splitlines():
        if line.startswith("distil ffn"):
            h, m, s = line.split()[-1].split(":")
            return int(h) * 3600 + int(m) * 60 + int(s)
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--teacher-steps", type=int, default=150)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--ffn-keep", type=int, default=64)
    parser.add_argument("--groups-keep", type=int, default=1)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        teacher = _teacher(Path(tmp), args.teacher_steps)
        rows = [_compress(teacher, Path(tmp) / r, args, r) for r in ("in-process", "ray")]
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    for r in rows:
        print(
            f"{r['recovery']:>10}: pruned {r['pruned_val_loss']:.4f} -> recovered "
            f"{r['recovered_val_loss']:.4f} (final KL {r['final_kl']:.4f}); mla compress "
            f"{r['wall_s']:.1f} s, distillation stage {r['distil_stage_s']} s"
        )
    gap = rows[1]["recovered_val_loss"] - rows[0]["recovered_val_loss"]
    print(f"ray - in-process recovered val loss: {gap:+.4f} nats/token")


if __name__ == "__main__":
    main()
