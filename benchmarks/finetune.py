"""Fine-tuning benchmark: the last layers vs every layer, from one checkpoint, side by side.

Both fine-tunes are ``mla train configs/finetune_tiny.yaml`` from the same source checkpoint on
the same other corpus (default: the standard library's ``test/test_asyncio`` folder, which the
source's corpus leaves out), with the same steps, batch, schedule, seed and layout (2 DeepSpeed
data-parallel workers, ZeRO-2); one trains only the config's last blocks
(``train.trainable_last_layers``, head frozen), the other every parameter. It prints the trainable
vs total parameters of each, their tokens/s and the ratio, wall times (whole ``mla train`` runs,
each starting its own embedded Ray) and validation losses at start and end.

The source is ``--source RUN`` (e.g. ``runs/tiny`` after ``make train``); without it, the script
first trains one with ``configs/tiny.yaml`` (``--source-steps``, 300 as ``make train``), into
``--keep DIR`` when given. ``--repeats N`` runs N pairs in alternating order (last/full,
full/last, ...) so that a change of machine load during the runs does not favour one side; the
ratio is of the mean tokens/s.

Run: ``python -m benchmarks.finetune [--source runs/tiny] [--steps 60] [--repeats 2] [--json]``.
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
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--keep", help="folder for the source run (default: a temporary one)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        source = args.source
        if source is None:
            home = Path(args.keep) if args.keep else root
            train("configs/tiny.yaml", home, "source", [f"train.steps={args.source_steps}"])
            source = str(home / "source")
        common = [
            f"model.init_from={source}",
            f"data.path={args.data}",
            f"train.steps={args.steps}",
            "checkpoint.every=1000000",
            "train.tensorboard=false",
        ]
        sides = {
            "last": common,
            "full": [*common, "train.trainable_last_layers=null", "train.train_head=true"],
        }
        runs: dict[str, list[tuple[dict, float]]] = {"last": [], "full": []}
        for i in range(args.repeats):
            for side in ("last", "full") if i % 2 == 0 else ("full", "last"):
                runs[side].append(
                    train("configs/finetune_tiny.yaml", root, f"{side}{i}", sides[side])
                )
    last, full = runs["last"][0][0], runs["full"][0][0]
    speed = {k: [r[0]["tokens_per_s"] for r in v] for k, v in runs.items()}
    wall = {k: [round(r[1], 1) for r in v] for k, v in runs.items()}
    mean = {k: sum(v) / len(v) for k, v in speed.items()}
    result = {
        "source": args.source or f"configs/tiny.yaml, {args.source_steps} steps",
        "data": args.data,
        "steps": args.steps,
        "total_parameters": full["total_parameters"],
        "trainable_last": last["trainable_parameters"],
        "trainable_full": full["trainable_parameters"],
        "repeats": args.repeats,
        "tokens_per_s_last": [round(v) for v in speed["last"]],
        "tokens_per_s_full": [round(v) for v in speed["full"]],
        "tokens_per_s_ratio": round(mean["last"] / mean["full"], 3),
        "wall_s_last": wall["last"],
        "wall_s_full": wall["full"],
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
            f"tokens/s: last layers {result['tokens_per_s_last']} vs full "
            f"{result['tokens_per_s_full']} (mean ratio {result['tokens_per_s_ratio']:.2f}x); "
            f"wall {result['wall_s_last']} s vs {result['wall_s_full']} s"
        )
        print(
            f"val_loss: start {result['val_loss_start']:.4f}; last layers "
            f"{result['val_loss_last']:.4f}; full {result['val_loss_full']:.4f}"
        )
    return result


if __name__ == "__main__":
    main()
