"""Fine-tuning benchmark: the last layers vs every layer, from one checkpoint, side by side.

Both fine-tunes are ``mla train configs/finetune_tiny.yaml`` from the same source checkpoint on
the same other corpus (default: the standard library's ``test/test_asyncio`` folder, which the
source's corpus leaves out), with the same steps, batch, schedule, seed and layout (2 DeepSpeed
data-parallel workers, ZeRO-2); one trains only the config's last blocks
(``train.trainable_last_layers``, head frozen), the other every parameter. It prints the trainable
vs total parameters of each, their tokens/s and the ratio, wall times (whole ``mla train`` runs,
each starting its own embedded Ray) and validation losses at start and end.

The source is ``--source RUN`` (e.g. ``runs/tiny`` after ``make train``); without it, the script
first trains one with ``configs/tiny.yaml`` (``--source-steps``, 300 as ``make train``).

Run: ``python -m benchmarks.finetune [--source runs/tiny] [--steps 60] [--json]``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path


def train(config: str, run_dir: Path, name: str, sets: list[str]) -> tuple[dict, float]:
    """Run ``mla train CONFIG`` and return its summary and wall time in seconds.

    Raises:
        RuntimeError: the run failed (its stderr tail is in the message).
    """
    sets = [f"run.dir={run_dir}", f"run.name={name}", *sets]
    cmd = [sys.executable, "-m", "orchestrator.cli", "train", config]
    cmd += [a for s in sets for a in ("--set", s)]
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{proc.stderr[-3000:]}")
    return json.loads((run_dir / name / "summary.json").read_text()), wall


def default_corpus() -> str:
    """The standard library's asyncio tests (outside the default training corpus)."""
    return str(Path(sysconfig.get_paths()["stdlib"]) / "test" / "test_asyncio")


def main(argv: list[str] | None = None) -> dict:
    """Run the fine-tunes (and the source if needed) and print the comparison."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", help="run or checkpoint folder to fine-tune from")
    parser.add_argument("--source-steps", type=int, default=300)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--data", default=default_corpus())
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        source = args.source
        if source is None:
            train("configs/tiny.yaml", root, "source", [f"train.steps={args.source_steps}"])
            source = str(root / "source")
        common = [
            f"model.init_from={source}",
            f"data.path={args.data}",
            f"train.steps={args.steps}",
            "checkpoint.every=1000000",
            "train.tensorboard=false",
        ]
        last, last_wall = train("configs/finetune_tiny.yaml", root, "last", common)
        full, full_wall = train(
            "configs/finetune_tiny.yaml",
            root,
            "full",
            [*common, "train.trainable_last_layers=null", "train.train_head=true"],
        )
    result = {
        "source": args.source or f"configs/tiny.yaml, {args.source_steps} steps",
        "data": args.data,
        "steps": args.steps,
        "total_parameters": full["total_parameters"],
        "trainable_last": last["trainable_parameters"],
        "trainable_full": full["trainable_parameters"],
        "tokens_per_s_last": round(last["tokens_per_s"]),
        "tokens_per_s_full": round(full["tokens_per_s"]),
        "tokens_per_s_ratio": round(last["tokens_per_s"] / full["tokens_per_s"], 3),
        "wall_s_last": round(last_wall, 1),
        "wall_s_full": round(full_wall, 1),
        "val_loss_start": last["first_val_loss"],
        "val_loss_last": last["last_val_loss"],
        "val_loss_full": full["last_val_loss"],
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        share = result["trainable_last"] / result["total_parameters"]
        print(f"{args.steps} steps on {args.data}, from {result['source']}, 2 workers ZeRO-2")
        print(
            f"trainable: last layers {result['trainable_last']:,} of "
            f"{result['total_parameters']:,} ({share:.1%}); full {result['trainable_full']:,}"
        )
        print(
            f"tokens/s: last layers {result['tokens_per_s_last']:,} vs full "
            f"{result['tokens_per_s_full']:,} ({result['tokens_per_s_ratio']:.2f}x); wall "
            f"{result['wall_s_last']:.0f} s vs {result['wall_s_full']:.0f} s"
        )
        print(
            f"val_loss: start {result['val_loss_start']:.4f}; last layers "
            f"{result['val_loss_last']:.4f}; full {result['val_loss_full']:.4f}"
        )
    return result


if __name__ == "__main__":
    main()
