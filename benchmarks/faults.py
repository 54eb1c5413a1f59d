"""Fault-injection soak: SIGKILL a random worker N times during one training run (at random
moments, some of them while a checkpoint is being written), then compare the run with an
uninterrupted one.

Run: ``.venv/bin/python -m benchmarks.faults --kills 20`` (tiny job, 2 CPU workers). Prints, per
kill, the rank, the moment (``during checkpoint write`` or ``random``), the newest complete
checkpoint at that moment and the step the restarted worker group resumed from; then

* ``steps compared``: every step's loss of the killed run next to the uninterrupted run (max
  absolute difference; 0 means bit-identical);
* ``final parameters``: max absolute difference of every consolidated tensor of the last checkpoints;
* ``lost steps``: for each kill, resumed-from step minus the newest complete checkpoint at the
  kill (negative would mean a checkpoint was lost).

Exit status 0 when all three hold (identical losses and parameters, no step lost beyond the last
checkpoint before each kill), else 1.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
JOB = [
    "model.preset=tiny",
    "data.seq_len=64",
    "train.micro_batch=4",
    "train.global_batch=16",
    "train.warmup_steps=5",
    "train.log_every=1",
    "train.eval_batches=1",
    "checkpoint.keep=2",
    "cluster.num_workers=2",
]


def _cmd(out: Path, name: str, steps: int, every: int, extra: list[str]) -> list[str]:
    sets = [
        *JOB,
        f"train.steps={steps}",
        f"train.eval_every={steps}",
        f"checkpoint.every={every}",
        f"run.dir={out}",
        f"run.name={name}",
        *extra,
    ]
    return [
        sys.executable,
        "-m",
        "orchestrator.cli",
        "train",
        str(ROOT / "configs" / "tiny.yaml"),
        *[a for s in sets for a in ("--set", s)],
    ]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


def newest_complete(run_dir: Path) -> int:
    """Step of the newest checkpoint folder that has its manifest (0 if none)."""
    from orchestrator.contract.checkpoints import complete_checkpoints

    found = complete_checkpoints(run_dir)
    return found[-1][0] if found else 0


def _starts(run_dir: Path) -> list[dict]:
    path = run_dir / "events.jsonl"
    if not path.exists():
        return []
    return [
        e
        for e in (json.loads(line) for line in path.read_text().splitlines() if line.strip())
        if e.get("event") == "start"
    ]


def _pid(run_dir: Path, rank: int) -> int | None:
    try:
        return int(json.loads((run_dir / "workers" / f"rank_{rank}.json").read_text())["pid"])
    except (OSError, ValueError, KeyError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except OSError:
        return False


def _last_step(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    try:
        lines = path.read_text().splitlines()
        return json.loads(lines[-1])["step"] if lines else 0
    except (OSError, ValueError, KeyError, IndexError):
        return 0


@dataclass
class Kill:
    rank: int
    moment: str
    checkpoint_at_kill: int
    step_at_kill: int
    starts_before: int = 0  # worker-group start events written before the kill
    resumed_from: int | None = None


def pair_restarts(kills: list[Kill], starts: list[dict]) -> None:
    """Set each kill's ``resumed_from``: the step of the first worker-group start written after
    it (``starts[kill.starts_before]``; a start from no checkpoint is step 0), ``None`` only when
    no start followed (the run ended). Pairing by index of the start events, not by kill count,
    stays right when one kill causes two starts (a restart that fails at startup is retried).
    """
    for kill in kills:
        if kill.starts_before < len(starts):
            kill.resumed_from = starts[kill.starts_before].get("resumed_from_step") or 0


@dataclass
class Soak:
    kills: list[Kill] = field(default_factory=list)
    returncode: int | None = None
    stderr: str = ""


def _wait_for_kill_moment(
    proc, run_dir: Path, target: int, during_write: bool, deadline: float
) -> bool:
    """Wait until the run reached step ``target`` (and, for ``during_write``, until a checkpoint
    is being written after it); ``False`` if the run ended or the kill window closed first."""
    root = run_dir / "checkpoints"
    while proc.poll() is None and time.time() < deadline:
        if _last_step(run_dir) >= target:
            if not during_write:
                return True
            if root.is_dir() and any(p.name.startswith(".tmp-step_") for p in root.iterdir()):
                return True
        time.sleep(0.01)
    return False


def run_with_kills(
    out: Path,
    steps: int,
    every: int,
    n_kills: int,
    seed: int,
    kill_window_s: float,
    timeout_s: float,
) -> Soak:
    """Train ``faulty`` and SIGKILL a random rank ``n_kills`` times (within ``kill_window_s``),
    each after 1..2*``every`` new steps of its attempt; returns what happened."""
    rng = random.Random(seed)
    run_dir = out / "faulty"
    log = open(out / "faulty.log", "w")
    proc = subprocess.Popen(
        _cmd(out, "faulty", steps, every, [f"cluster.max_failures={n_kills + 2}"]),
        stdout=log,
        stderr=subprocess.STDOUT,
        env=_env(),
        cwd=ROOT,
    )
    # pids of earlier attempts: a rank file not yet rewritten by the new attempt still names one
    soak, stale_pids = Soak(), set[int]()
    start, deadline = time.time(), time.time() + kill_window_s
    try:
        while len(soak.kills) < n_kills and proc.poll() is None and time.time() < deadline:
            starts = _starts(run_dir)
            seen = soak.kills[-1].starts_before if soak.kills else 0
            if len(starts) <= seen:  # wait for a worker group started after the last kill
                time.sleep(0.2)
                continue
            rank = rng.randrange(2)
            pid = _pid(run_dir, rank)
            if pid is None or pid in stale_pids or not _alive(pid):
                time.sleep(0.2)
                continue
            resumed = starts[-1].get("resumed_from_step") or 0
            during_write = rng.random() < 0.35
            target = min(steps - 1, resumed + rng.randint(1, 2 * every))
            if not _wait_for_kill_moment(proc, run_dir, target, during_write, deadline):
                break
            kill = Kill(
                rank,
                "during checkpoint write" if during_write else "random",
                newest_complete(run_dir),
                _last_step(run_dir),
                len(_starts(run_dir)),
            )
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                continue
            stale_pids.update(p for p in (_pid(run_dir, r) for r in range(2)) if p is not None)
            soak.kills.append(kill)
            print(
                f"kill {len(soak.kills):>2} at {time.time() - start:6.0f} s: rank {rank} at step "
                f"{kill.step_at_kill} ({kill.moment}), newest complete checkpoint {kill.checkpoint_at_kill}",
                flush=True,
            )
        proc.wait(timeout=timeout_s)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()
    soak.returncode = proc.returncode
    soak.stderr = (out / "faulty.log").read_text()
    pair_restarts(soak.kills, _starts(run_dir))
    return soak


def step_losses(run_dir: Path) -> dict[int, float]:
    """Step -> loss of every logged step (log_every = 1) in ``metrics.jsonl``."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record.get("loss") is not None:
            out[record["step"]] = record["loss"]
    return out


def final_parameter_difference(a: Path, b: Path) -> float:
    """Max absolute difference over every tensor (parameters and AdamW moments) of two final
    consolidated checkpoints."""
    from orchestrator.contract.checkpoints import latest_checkpoint
    from workers.parallel.reshard import read_consolidated

    _, ta = read_consolidated(latest_checkpoint(a)[1] / "consolidated")
    _, tb = read_consolidated(latest_checkpoint(b)[1] / "consolidated")
    worst = 0.0
    for kind in ta:
        assert set(ta[kind]) == set(tb[kind]), kind
        for name, t in ta[kind].items():
            worst = max(worst, float((t.double() - tb[kind][name].double()).abs().max()))
    return worst


def soak(
    out: Path,
    kills: int,
    steps: int,
    every: int,
    seed: int = 0,
    timeout_s: float = 3600,
    kill_window_s: float | None = None,
) -> dict:
    """The whole benchmark; returns the figures (also printed)."""
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    ref = subprocess.run(
        _cmd(out, "reference", steps, every, []),
        capture_output=True,
        text=True,
        env=_env(),
        cwd=ROOT,
        timeout=timeout_s,
    )
    if ref.returncode:
        raise RuntimeError(f"uninterrupted run failed:\n{ref.stderr[-3000:]}")
    t_ref = time.time() - t0
    result = run_with_kills(out, steps, every, kills, seed, kill_window_s or timeout_s, timeout_s)
    t_faulty = time.time() - t0 - t_ref
    if result.returncode:
        raise RuntimeError(
            f"killed run failed (exit {result.returncode}):\n{result.stderr[-3000:]}"
        )
    ref_losses, got = step_losses(out / "reference"), step_losses(out / "faulty")
    missing = sorted(set(ref_losses) - set(got))
    loss_diff = max(
        (abs(got[s] - ref_losses[s]) for s in ref_losses if s in got), default=float("inf")
    )
    param_diff = final_parameter_difference(out / "reference", out / "faulty")
    lost = [
        k.resumed_from - k.checkpoint_at_kill if k.resumed_from is not None else None
        for k in result.kills
    ]
    figures = {
        "kills": len(result.kills),
        "during_checkpoint_write": sum(k.moment != "random" for k in result.kills),
        "steps": steps,
        "steps_compared": len(ref_losses) - len(missing),
        "missing_steps": missing,
        "max_loss_difference": loss_diff,
        "max_final_tensor_difference": param_diff,
        "resumed_minus_newest_checkpoint": lost,
        "reference_s": round(t_ref, 1),
        "killed_run_s": round(t_faulty, 1),
    }
    for k in result.kills:
        print(
            f"  rank {k.rank} {k.moment:>24}: newest complete checkpoint {k.checkpoint_at_kill}, resumed from "
            f"{k.resumed_from}"
        )
    print(json.dumps(figures, indent=2))
    figures["ok"] = (
        not missing
        and loss_diff == 0.0
        and param_diff == 0.0
        and all(x is not None and x >= 0 for x in lost)
    )
    print(
        "OK: identical losses and final tensors, no step lost beyond the last checkpoint"
        if figures["ok"]
        else "FAILED"
    )
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--checkpoint-every", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/faults"))
    parser.add_argument("--timeout-s", type=float, default=3600)
    parser.add_argument(
        "--kill-window-s",
        type=float,
        default=None,
        help="Stop killing after this many seconds of the killed run (default: --timeout-s)",
    )
    args = parser.parse_args(argv)
    if args.kills < 0 or args.steps < 1 or args.checkpoint_every < 1:
        parser.error("--kills >= 0, --steps >= 1 and --checkpoint-every >= 1")
    import shutil

    shutil.rmtree(args.out, ignore_errors=True)
    figures = soak(
        args.out,
        args.kills,
        args.steps,
        args.checkpoint_every,
        args.seed,
        args.timeout_s,
        args.kill_window_s,
    )
    return 0 if figures["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
