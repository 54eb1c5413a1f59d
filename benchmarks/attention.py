"""Attention-core benchmark: dense causal SDPA against multi-level attention (MLA).

Both implementations get the same q, k, v ``(1, heads, n, head_dim)`` (projections are not
timed). MLA runs in its fast mode with the block selection (``indexer="block"``), gated mix: on CPU
the blocked sliding window plus the blocked selected-block branch; on CUDA with a block of 128 the
compiled FlexAttention core (:mod:`mla.flex_attention`).

Time: for each n and pass (forward, forward+backward), dense and MLA are run *alternately*
(warm-up first, then ``repeats`` timed runs each), so that load from other processes on a shared
machine hits both alike; the median of each is reported and the ratio dense/MLA is taken from
the same run. The growth exponent b of ``time ~ n^b`` is a least-squares fit of log time on
log n.

Peak memory: on CUDA, ``torch.cuda.max_memory_allocated`` above the inputs. On CPU, each (impl,
n, pass) runs once more in a fresh subprocess started with ``MALLOC_MMAP_THRESHOLD_=65536`` (so
glibc maps every block of 64 KiB or more and gives it back on free: resident memory follows the
live tensors). That process builds its inputs, runs one warm-up pass, resets the kernel's
high-water mark (``/proc/self/clear_refs``), runs the pass again and reports ``VmHWM`` minus the
resident size before the pass, i.e. the peak extra resident memory of one pass (activations,
saved tensors, gradients of q, k, v), in MiB.

Run: ``mla bench attention [--json]`` or ``python -m benchmarks.attention``.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from mla.attention import multi_level_attention

PASSES = ("forward", "forward_backward")
IMPLS = ("dense", "mla")


@dataclass(frozen=True)
class AttentionBenchSettings:
    """What to benchmark.

    Attributes:
        seq_lens: Sequence lengths n, in tokens.
        window: Local window w, in tokens.
        top_k: ``global_k``: earlier-key budget of the global branch (``ceil(top_k / block)``
            selected blocks).
        block: Block size of the blocked local path and of the block selection, in tokens.
        heads: Attention heads (batch is 1).
        head_dim: Features per head.
        repeats: Timed runs per (impl, n, pass), after one warm-up run.
        device: ``"cpu"`` or ``"cuda"``.
        threads: CPU intra-op threads (``None``: torch's default).
        memory: Whether to measure peak memory.
    """

    seq_lens: tuple[int, ...] = (1024, 2048, 4096, 8192, 16384)
    window: int = 128
    top_k: int = 16
    block: int = 64
    heads: int = 4
    head_dim: int = 64
    repeats: int = 3
    device: str = "cpu"
    threads: int | None = None
    memory: bool = True

    @property
    def dtype(self) -> torch.dtype:
        """fp32 on CPU, bf16 on GPU."""
        return torch.float32 if self.device == "cpu" else torch.bfloat16


@dataclass
class Record:
    """One measurement: ``{impl, n, pass, median_ms, peak_memory_mb}`` (``pass`` in JSON)."""

    impl: str
    n: int
    pass_: str
    median_ms: float
    peak_memory_mb: float | None = None
    times_ms: list[float] = field(default_factory=list)

    def to_json(self) -> dict:
        """The JSON record: ``impl``, ``n``, ``pass``, ``median_ms``, ``peak_memory_mb``."""
        out = asdict(self)
        out["pass"] = out.pop("pass_")
        out.pop("times_ms")
        return out


def make_inputs(s: AttentionBenchSettings, n: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random q, k, v ``(1, heads, n, head_dim)`` and gate ``(1, heads, n)``, requiring grad."""
    gen = torch.Generator().manual_seed(seed)
    shape = (1, s.heads, n, s.head_dim)
    tensors = {name: torch.randn(shape, generator=gen) for name in ("q", "k", "v")}
    tensors["gate"] = torch.rand(shape[:3], generator=gen)
    return {k: t.to(s.device, s.dtype).requires_grad_() for k, t in tensors.items()}


def run_impl(impl: str, s: AttentionBenchSettings, x: dict[str, torch.Tensor]) -> torch.Tensor:
    """Dense causal SDPA or MLA (block selection, gated) on the inputs ``x``."""
    if impl == "dense":
        return F.scaled_dot_product_attention(x["q"], x["k"], x["v"], is_causal=True)
    return multi_level_attention(
        x["q"],
        x["k"],
        x["v"],
        x["gate"],
        window=s.window,
        top_k=s.top_k,
        indexer="block",
        block=s.block,
    )


def run_pass(impl: str, pass_: str, s: AttentionBenchSettings, x: dict[str, torch.Tensor]) -> None:
    """One forward (no autograd graph) or forward+backward pass, synchronised on CUDA."""
    if pass_ == "forward":
        with torch.no_grad():
            run_impl(impl, s, x)
    else:
        for t in x.values():
            t.grad = None
        out = run_impl(impl, s, x)
        out.backward(torch.ones_like(out))
    if s.device == "cuda":
        torch.cuda.synchronize()


def time_side_by_side(s: AttentionBenchSettings, n: int, pass_: str) -> dict[str, list[float]]:
    """Wall times (ms) of dense and MLA, alternated run by run (first run of each dropped)."""
    x = make_inputs(s, n)
    times: dict[str, list[float]] = {impl: [] for impl in IMPLS}
    for _ in range(s.repeats + 1):
        for impl in IMPLS:
            start = time.perf_counter()
            run_pass(impl, pass_, s, x)
            times[impl].append((time.perf_counter() - start) * 1e3)
    return {impl: t[1:] for impl, t in times.items()}


def peak_memory_mb(impl: str, n: int, pass_: str, s: AttentionBenchSettings) -> float:
    """Peak extra memory of one pass, in MiB (method in the module docstring)."""
    if s.device == "cuda":
        x = make_inputs(s, n)
        run_pass(impl, pass_, s, x)
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run_pass(impl, pass_, s, x)
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    return _cpu_peak_memory_subprocess(impl, n, pass_, s)


def _cpu_peak_memory_subprocess(impl: str, n: int, pass_: str, s: AttentionBenchSettings) -> float:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="65536")
    payload = json.dumps({"impl": impl, "n": n, "pass": pass_, "settings": asdict(s)})
    code = "import sys; from benchmarks.attention import _memory_child; _memory_child(sys.argv[1])"
    out = subprocess.run(
        [sys.executable, "-c", code, payload], env=env, check=True, capture_output=True, text=True
    )
    return float(out.stdout.strip().splitlines()[-1])


def _memory_child(payload: str) -> None:
    """Subprocess body of the CPU memory measurement: prints the peak extra RSS in MiB."""
    args = json.loads(payload)
    cfg = dict(args["settings"], seq_lens=tuple(args["settings"]["seq_lens"]))
    s = AttentionBenchSettings(**cfg)
    if s.threads:
        torch.set_num_threads(s.threads)
    x = make_inputs(s, args["n"])
    run_pass(args["impl"], args["pass"], s, x)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    base = _status_kib("VmRSS")
    run_pass(args["impl"], args["pass"], s, x)
    print((_status_kib("VmHWM") - base) / 1024)


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{key} not found in /proc/self/status")


def run_benchmark(s: AttentionBenchSettings, progress=None) -> list[Record]:
    """Measure every (impl, n, pass); ``progress(msg)`` is called before each step."""
    if s.threads:
        torch.set_num_threads(s.threads)
    records = []
    for n in s.seq_lens:
        for pass_ in PASSES:
            if progress:
                progress(f"n={n} {pass_}")
            times = time_side_by_side(s, n, pass_)
            for impl in IMPLS:
                mem = peak_memory_mb(impl, n, pass_, s) if s.memory else None
                records.append(
                    Record(impl, n, pass_, statistics.median(times[impl]), mem, times[impl])
                )
    return records


def growth_exponent(records: list[Record], impl: str, pass_: str) -> float:
    """Least-squares slope b of ``log(median_ms) = a + b log(n)`` over the measured n."""
    pts = [
        (math.log(r.n), math.log(r.median_ms))
        for r in records
        if r.impl == impl and r.pass_ == pass_
    ]
    if len(pts) < 2:
        return float("nan")
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    return sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x, _ in pts)


def ratios(records: list[Record]) -> dict[tuple[int, str], tuple[float, float | None]]:
    """``(n, pass) -> (time dense/MLA, memory dense/MLA or None)`` from one run's records."""
    by = {(r.impl, r.n, r.pass_): r for r in records}
    out = {}
    for (impl, n, pass_), r in by.items():
        if impl == "dense" and ("mla", n, pass_) in by:
            m = by[("mla", n, pass_)]
            mem = (
                r.peak_memory_mb / m.peak_memory_mb
                if r.peak_memory_mb and m.peak_memory_mb
                else None
            )
            out[(n, pass_)] = (r.median_ms / m.median_ms, mem)
    return out


def render(records: list[Record], s: AttentionBenchSettings, console) -> None:
    """Print the table of times, memory and ratios, and the growth exponents (rich)."""
    from rich.table import Table

    table = Table(
        title=f"attention core, {s.device} {str(s.dtype).removeprefix('torch.')}, "
        f"H={s.heads} hd={s.head_dim} w={s.window} k={s.top_k} B={s.block}"
    )
    for col in (
        "n",
        "pass",
        "dense ms",
        "MLA ms",
        "dense/MLA time",
        "dense MiB",
        "MLA MiB",
        "dense/MLA mem",
    ):
        table.add_column(col, justify="right")
    by = {(r.impl, r.n, r.pass_): r for r in records}
    for (n, pass_), (t_ratio, m_ratio) in ratios(records).items():
        d, m = by[("dense", n, pass_)], by[("mla", n, pass_)]
        table.add_row(
            str(n),
            pass_,
            f"{d.median_ms:.1f}",
            f"{m.median_ms:.1f}",
            f"{t_ratio:.2f}x",
            _mb(d.peak_memory_mb),
            _mb(m.peak_memory_mb),
            "-" if m_ratio is None else f"{m_ratio:.2f}x",
        )
    console.print(table)
    for pass_ in PASSES:
        console.print(
            f"time ~ n^b, {pass_}: dense b={growth_exponent(records, 'dense', pass_):.2f}, "
            f"MLA b={growth_exponent(records, 'mla', pass_):.2f}"
        )
    _print_memory_growth(records, console)


def _print_memory_growth(records: list[Record], console) -> None:
    ns = sorted({r.n for r in records})
    if len(ns) < 2:
        return
    by = {(r.impl, r.n, r.pass_): r.peak_memory_mb for r in records}
    for impl in IMPLS:
        a, b = (
            by.get((impl, ns[-2], "forward_backward")),
            by.get((impl, ns[-1], "forward_backward")),
        )
        if a and b:
            console.print(
                f"peak memory {impl}, forward_backward: n={ns[-1]} / n={ns[-2]} = {b / a:.2f}"
            )


def _mb(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def main(argv: list[str] | None = None) -> None:
    """``python -m benchmarks.attention [--json]``: default settings, table to stderr."""
    from orchestrator.cli_common import err as console

    settings = AttentionBenchSettings()
    records = run_benchmark(settings, progress=lambda msg: console.log(msg))
    render(records, settings, console)
    if argv and "--json" in argv:
        print(json.dumps([r.to_json() for r in records], indent=2))


if __name__ == "__main__":
    main(sys.argv[1:])
