"""Privacy benchmark: the tiny model trained with and without DP-SGD, side by side in one run.

Both runs are ``mla train configs/tiny.yaml`` on the default corpus (the Python standard
library's sources) under the same layout (2 DeepSpeed data-parallel workers, ZeRO-1: the highest
stage DP-SGD runs under), steps, batch, schedule and seed; the private run adds
``train.privacy.target_epsilon`` (default 8; delta 1 / (2 N), RDP accountant, max_grad_norm 1,
Poisson sampling with the same expected batch). It prints each run's validation loss, the epsilon
spent, and the wall-time ratio private / non-private (whole ``mla train`` runs, each starting its
own embedded Ray).

Run: ``python -m benchmarks.privacy [--steps 300] [--epsilon 8] [--json]``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path


def train(run_dir: Path, name: str, steps: int, extra: list[str]) -> tuple[dict, float]:
    """Run ``mla train`` and return its summary and wall time in seconds.

    Raises:
        RuntimeError: the run failed (its stderr tail is in the message).
    """
    from benchmarks.finetune import train as train_config

    sets = [f"train.steps={steps}", "parallel.zero_stage=1", "checkpoint.every=1000000", *extra]
    return train_config("configs/tiny.yaml", run_dir, name, sets)


def main(argv: list[str] | None = None) -> dict:
    """Run both trainings and print the comparison (``--json`` for one JSON document)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--epsilon", type=float, default=8.0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        base, base_wall = train(Path(tmp), "plain", args.steps, [])
        dp, dp_wall = train(
            Path(tmp), "private", args.steps, [f"train.privacy.target_epsilon={args.epsilon}"]
        )
    result = {
        "steps": args.steps,
        "target_epsilon": args.epsilon,
        "epsilon": dp["epsilon"],
        "delta": dp["delta"],
        "noise_multiplier": dp["privacy"]["noise_multiplier"],
        "sample_rate": dp["privacy"]["sample_rate"],
        "val_loss_plain": base["last_val_loss"],
        "val_loss_private": dp["last_val_loss"],
        "first_val_loss": base["first_val_loss"],
        "wall_s_plain": round(base_wall, 1),
        "wall_s_private": round(dp_wall, 1),
        "wall_time_ratio": round(dp_wall / base_wall, 3),
        "tokens_per_s_plain": round(base["tokens_per_s"]),
        "tokens_per_s_private": round(dp["tokens_per_s"]),
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{args.steps} steps, tiny model, 2 workers ZeRO-1, default corpus")
        print(
            f"val_loss: start {result['first_val_loss']:.4f}; non-private {result['val_loss_plain']:.4f}; "
            f"private {result['val_loss_private']:.4f} at epsilon {result['epsilon']:.3g} "
            f"(delta {result['delta']:.2g}, noise_multiplier {result['noise_multiplier']:.3g}, "
            f"q {result['sample_rate']:.2g})"
        )
        print(
            f"wall time: non-private {result['wall_s_plain']:.0f} s, private {result['wall_s_private']:.0f} s "
            f"({result['wall_time_ratio']:.2f}x); tokens/s {result['tokens_per_s_plain']:,} vs "
            f"{result['tokens_per_s_private']:,}"
        )
    return result


if __name__ == "__main__":
    main()
