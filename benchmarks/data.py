"""Data at scale, measured side by side in one run (issue 18):

1. ``mla prepare`` throughput (MB of UTF-8 text per second) on the standard-library corpus with a
   BPE tokenizer: 2 Ray Data workers on an embedded local Ray vs one process (``--workers 0``);
2. peak RSS of a training worker (rank 0's ``peak_memory_gib``, ``ru_maxrss``: memory-mapped
   pages it touched included) training on a prepared corpus of at least 1 GB (the standard
   library repeated, generated into a temporary folder, deleted afterwards) vs on the prepared
   standard library: it must not grow with the corpus (within 10%);
3. worker data start-up: ``load_corpus`` + the ``WindowBatches`` of both splits (what each worker
   does before its first step) on the prepared 1 GB corpus, the prepared standard library and
   the unprepared standard library;
4. a BPE run vs a byte run of the same model (same steps, sequences and batch): validation bits
   per byte (``mla eval``: total nats / (ln 2 x UTF-8 bytes), Gao et al. 2020) and wall time.

Run: ``.venv/bin/python -m benchmarks.data --steps 60 --json``. Everything it writes goes under a
temporary folder (``--work``), removed at the end unless ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "RAYON_NUM_THREADS": "1"}
JOB = [
    "data.seq_len=128",
    "train.micro_batch=8",
    "train.global_batch=16",
    "train.warmup_steps=5",
    "train.log_every=5",
    "train.eval_batches=4",
    "cluster.num_workers=2",
    "train.tensorboard=false",
]


def _mla(*args: str, timeout: float = 1800) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "orchestrator.cli", *args]
    ran = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    if ran.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{ran.stderr[-3000:]}")
    return ran


def _prepare(data: str, out: Path, tokenizer: str, workers: int) -> dict:
    started = time.perf_counter()
    ran = _mla(
        "prepare",
        data,
        "--out",
        str(out),
        "--tokenizer",
        tokenizer,
        "--workers",
        str(workers),
        "--json",
    )
    seconds = time.perf_counter() - started
    manifest = json.loads(ran.stdout)
    n_bytes = sum(s["bytes"] for s in manifest["splits"].values())
    return {"seconds": seconds, "bytes": n_bytes, "mb_per_s": n_bytes / 1e6 / seconds}


def _big_corpus(folder: Path, min_bytes: int) -> int:
    """The standard library's files copied (hard links where possible) until ``min_bytes``."""
    from workers.data import stdlib_files

    files, total, copy = stdlib_files(), 0, 0
    while total < min_bytes:
        target = folder / f"copy{copy:03d}"
        target.mkdir(parents=True)
        for i, p in enumerate(files):
            dest = target / f"{i:05d}_{p.name}"
            try:
                os.link(p, dest)
            except OSError:
                shutil.copyfile(p, dest)
            total += p.stat().st_size
        copy += 1
    return total


def _train(work: Path, name: str, data: str, steps: int, extra: tuple[str, ...] = ()) -> dict:
    sets = [
        *JOB,
        f"train.steps={steps}",
        f"train.eval_every={steps}",
        f"checkpoint.every={steps}",
        f"run.dir={work / 'runs'}",
        f"run.name={name}",
        f"data.path={data}",
        *extra,
    ]
    started = time.perf_counter()
    _mla("train", "configs/tiny.yaml", *[a for s in sets for a in ("--set", s)])
    wall = time.perf_counter() - started
    records = [
        json.loads(x) for x in (work / "runs" / name / "metrics.jsonl").read_text().splitlines()
    ]
    peak = max(r.get("peak_memory_gib", 0.0) for r in records)
    val = [r["val_loss"] for r in records if "val_loss" in r][-1]
    ev = json.loads(_mla("eval", str(work / "runs" / name), "--json").stdout)
    return {
        "wall_s": wall,
        "peak_rss_gib": peak,
        "val_loss": val,
        "bits_per_byte": ev["bits_per_byte"],
        "eval_loss": ev["loss"],
        "eval_tokens": ev["tokens"],
    }


def _startup(path: str | None) -> float:
    code = (
        "import time,sys; t=time.perf_counter()\n"
        "from workers.data import load_corpus, WindowBatches\n"
        "c=load_corpus(None if sys.argv[1]=='-' else sys.argv[1])\n"
        "WindowBatches(c.train,128,1234); WindowBatches(c.val,128,1235)\n"
        "print(time.perf_counter()-t)"
    )
    ran = subprocess.run(
        [sys.executable, "-c", code, path or "-"],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=900,
        cwd=ROOT,
    )
    if ran.returncode:
        raise SystemExit(ran.stderr[-2000:])
    return float(ran.stdout.split()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=60, help="Optimizer steps of each training run.")
    ap.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary.")
    ap.add_argument("--big-gb", type=float, default=1.0, help="Size of the large corpus, GB.")
    ap.add_argument("--work", type=Path, default=None, help="Scratch folder (default: a temp one).")
    ap.add_argument("--keep", action="store_true", help="Keep the scratch folder.")
    ap.add_argument("--json", action="store_true", help="Print the figures as JSON.")
    args = ap.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="mla-bench-data-"))
    figures: dict = {}
    try:
        tok = work / "bpe.json"
        _mla(
            "tokenizer", "train", "stdlib", "--vocab-size", str(args.vocab_size), "--out", str(tok)
        )
        one = _prepare("stdlib", work / "bpe-local", str(tok), 0)
        ray = _prepare("stdlib", work / "bpe-ray", str(tok), 2)
        figures["prepare_bpe_stdlib"] = {
            "one_process": one,
            "ray_2_workers": ray,
            "ray_vs_one": ray["mb_per_s"] / one["mb_per_s"],
        }
        print(
            f"prepare (BPE {args.vocab_size}, stdlib {one['bytes'] / 1e6:.1f} MB): one process "
            f"{one['mb_per_s']:.2f} MB/s, 2 Ray workers {ray['mb_per_s']:.2f} MB/s "
            f"({figures['prepare_bpe_stdlib']['ray_vs_one']:.2f}x)",
            flush=True,
        )

        small = _prepare("stdlib", work / "byte-stdlib", "byte", 0)
        big_bytes = _big_corpus(work / "big-src", int(args.big_gb * 1e9))
        big = _prepare(str(work / "big-src"), work / "byte-big", "byte", 2)
        figures["prepare_byte_big"] = {**big, "source_bytes": big_bytes}
        print(
            f"prepare (byte, {big_bytes / 1e9:.2f} GB, 2 Ray workers): {big['mb_per_s']:.2f} MB/s "
            f"in {big['seconds']:.0f} s",
            flush=True,
        )
        shutil.rmtree(work / "big-src")

        figures["startup_s"] = {
            "prepared_big": _startup(str(work / "byte-big")),
            "prepared_stdlib": _startup(str(work / "byte-stdlib")),
            "unprepared_stdlib": _startup(None),
        }
        print(
            "worker data start-up (load_corpus + WindowBatches): "
            + ", ".join(f"{k} {v:.2f} s" for k, v in figures["startup_s"].items()),
            flush=True,
        )

        rss_small = _train(work, "rss-stdlib", str(work / "byte-stdlib"), args.steps)
        rss_big = _train(work, "rss-big", str(work / "byte-big"), args.steps)
        growth = rss_big["peak_rss_gib"] / rss_small["peak_rss_gib"]
        figures["peak_rss"] = {
            "stdlib": rss_small,
            "big": rss_big,
            "big_vs_stdlib": growth,
            "within_10pct": growth <= 1.10,
            "_small_prepare": small,
        }
        print(
            f"peak RSS per worker: stdlib {rss_small['peak_rss_gib'] * 1024:.0f} MiB, "
            f"{big_bytes / 1e9:.2f} GB corpus {rss_big['peak_rss_gib'] * 1024:.0f} MiB "
            f"({growth:.3f}x)",
            flush=True,
        )

        bpe = _train(work, "bpe", str(work / "bpe-local"), args.steps)
        figures["bpe_vs_byte"] = {"byte": rss_small, "bpe": bpe}
        print(
            f"validation bits per byte after {args.steps} steps of 16 x 128 tokens: byte "
            f"{rss_small['bits_per_byte']:.4f} ({rss_small['wall_s']:.0f} s), BPE "
            f"{bpe['bits_per_byte']:.4f} ({bpe['wall_s']:.0f} s)",
            flush=True,
        )
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
