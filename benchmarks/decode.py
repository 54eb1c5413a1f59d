"""Decode benchmark: incremental decoding of an MLA model vs the same model with dense attention.

Both models have the same shape and the same weights (one seed; only MLA has the gate); each
decodes with its own KV cache (:mod:`mla.kv_cache`): dense reads every cached key per token,
MLA its rolling window, the diagonal block, ``n_sel`` selected blocks and, once per block, the
pooled keys. For every (context n, batch b) both caches are filled with the same random rotated
queries/keys/values of n positions (:meth:`~mla.kv_cache.LayerCache.prefill`; a model prefill at
64k would time the dense prefill, not decoding), then both decode ``tokens`` new tokens
(a multiple of the block size, so MLA pays its per-block selection as often as it really does)
in alternating rounds of ``round_tokens``, so that load from other processes hits both alike.

Reported per (impl, n, b): decode tokens/s (b * tokens / total time), milliseconds per step,
cache size (MiB, exact tensor bytes), peak memory of decoding (the cache plus the largest extra
memory of the warm-up steps, which include a block start: CUDA ``max_memory_allocated`` above
the allocation before them; CPU peak resident memory above the resident memory before them,
reset through ``/proc/self/clear_refs``), and the per-token attention cost: keys read per query head
and per layer (dense ``n``; MLA ``min(w, n) + n_sel * B + (B + 1) / 2 + (n / B) / B``), and KV
MiB read per token over all layers. The ratio MLA/dense of tokens/s comes from the same run.

Run: ``mla bench decode [--json]`` or ``python -m benchmarks.decode``.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field

import torch

from mla.block_selection import num_selected_blocks
from mla.config import AttentionKind, ModelConfig
from mla.decoding import DecodeState, build_caches, decode_step
from mla.model import MLATransformer

IMPLS: tuple[AttentionKind, ...] = ("dense", "mla")


@dataclass(frozen=True)
class DecodeBenchSettings:
    """What to benchmark.

    Attributes:
        contexts: Tokens already in the cache, n.
        batches: Batch sizes b.
        tokens: New tokens timed per (impl, n, b); rounded up to a multiple of ``block``.
        round_tokens: Tokens per alternating round.
        warmup: Untimed tokens before timing.
        d_model, n_layers, n_heads, n_kv_heads, ffn_hidden: Model shape.
        window, global_k, block: MLA settings (w, global_k, B).
        device: ``"cpu"`` (fp32) or ``"cuda"`` (bf16).
        threads: CPU intra-op threads (``None``: torch's default).
    """

    contexts: tuple[int, ...] = (1024, 4096, 16384, 65536)
    batches: tuple[int, ...] = (1, 8)
    tokens: int = 64
    round_tokens: int = 16
    warmup: int = 4
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2
    ffn_hidden: int = 704
    window: int = 128
    global_k: int = 64
    block: int = 64
    device: str = "cpu"
    threads: int | None = None

    @property
    def dtype(self) -> torch.dtype:
        """fp32 on CPU, bf16 on GPU."""
        return torch.float32 if self.device == "cpu" else torch.bfloat16

    def model_config(self, attention: AttentionKind, max_seq_len: int) -> ModelConfig:
        """Shape of the benchmarked model (``attention`` is ``"mla"`` or ``"dense"``)."""
        return ModelConfig(
            vocab_size=256,
            d_model=self.d_model,
            n_layers=self.n_layers,
            n_heads=self.n_heads,
            n_kv_heads=self.n_kv_heads,
            ffn_hidden=self.ffn_hidden,
            max_seq_len=max_seq_len,
            attention=attention,
            local_window=self.window,
            global_k=self.global_k,
            block_size=self.block,
            indexer="block",
        )


@dataclass
class Record:
    """One measurement (see the module docstring for each field's meaning and unit)."""

    impl: str
    context: int
    batch: int
    tokens_per_s: float
    ms_per_step: float
    cache_mib: float
    peak_mib: float
    keys_per_token: float
    kv_mib_per_token: float
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)


def keys_per_token(impl: str, s: DecodeBenchSettings, n: int) -> float:
    """Keys read per query head per layer for one new token at context ~n (see module docstring)."""
    if impl == "dense":
        return float(n)
    b = s.block
    return min(s.window, n) + num_selected_blocks(s.global_k, b) * b + (b + 1) / 2 + (n / b) / b


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def _reset_peak(device: str) -> float:
    """Reset the peak-memory counter; return the current level in MiB."""
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() / 2**20
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass
    return _status_kib("VmRSS") / 1024


def _peak(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return _status_kib("VmHWM") / 1024


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def build_state(
    model: MLATransformer, s: DecodeBenchSettings, n: int, batch: int, seed: int
) -> DecodeState:
    """Caches of ``n`` random positions for every layer (capacity for the decoded tokens too)."""
    cfg = model.cfg
    caches = build_caches(model, batch, cfg.max_seq_len)
    g = torch.Generator().manual_seed(seed)
    for cache in caches:
        q = torch.randn(batch, cfg.n_heads, n, cfg.head_dim, generator=g).to(s.device, s.dtype)
        k = torch.randn(batch, cfg.kv_heads, n, cfg.head_dim, generator=g).to(s.device, s.dtype)
        v = torch.randn(batch, cfg.kv_heads, n, cfg.head_dim, generator=g).to(s.device, s.dtype)
        cache.prefill(q, k, v, tuple([n] * batch))
        del q, k, v
    return DecodeState(caches, [n] * batch, cfg.max_seq_len, torch.device(s.device))


def _decode(model: MLATransformer, state: DecodeState, tokens: torch.Tensor, steps: int) -> float:
    """Decode ``steps`` tokens; return seconds."""
    device = tokens.device.type
    _sync(device)
    t0 = time.perf_counter()
    tok = tokens
    for _ in range(steps):
        logits = decode_step(model, tok, state)
        tok = logits.argmax(-1)
    _sync(device)
    return time.perf_counter() - t0


def measure(s: DecodeBenchSettings, n: int, batch: int) -> list[Record]:
    """Both impls at context ``n`` and batch ``batch``, decoded in alternating rounds."""
    tokens = math.ceil(s.tokens / s.block) * s.block
    max_len = n + s.warmup + tokens
    models, states, cache_mib, peak = {}, {}, {}, {}
    for impl in IMPLS:
        torch.manual_seed(0)
        models[impl] = MLATransformer(s.model_config(impl, max_len)).to(s.device, s.dtype).eval()
    start = torch.randint(0, 256, (batch,), generator=torch.Generator().manual_seed(1)).to(s.device)
    for (
        impl
    ) in IMPLS:  # warm-up one impl at a time: its peak is its own (position n starts a block)
        states[impl] = build_state(models[impl], s, n, batch, seed=2)
        cache_mib[impl] = states[impl].nbytes() / 2**20
        _sync(s.device)
        base = _reset_peak(s.device)
        _decode(models[impl], states[impl], start, s.warmup)
        peak[impl] = cache_mib[impl] + max(0.0, _peak(s.device) - base)
    seconds = {impl: 0.0 for impl in IMPLS}
    done = 0
    while done < tokens:
        step = min(s.round_tokens, tokens - done)
        for impl in IMPLS:
            seconds[impl] += _decode(models[impl], states[impl], start, step)
        done += step
    records = []
    cfg = models["mla"].cfg
    for impl in IMPLS:
        keys = keys_per_token(impl, s, n)
        kv_bytes = (
            keys * cfg.kv_heads * cfg.head_dim * 2 * torch.finfo(s.dtype).bits / 8 * cfg.n_layers
        )
        records.append(
            Record(
                impl,
                n,
                batch,
                batch * tokens / seconds[impl],
                1000 * seconds[impl] / tokens,
                cache_mib[impl],
                peak[impl],
                keys,
                batch * kv_bytes / 2**20,
            )
        )
    del states
    return records


def run_benchmark(s: DecodeBenchSettings, progress=None) -> list[Record]:
    """Every (context, batch) of ``s``, both impls side by side."""
    if s.threads:
        torch.set_num_threads(s.threads)
    records: list[Record] = []
    for n in s.contexts:
        for b in s.batches:
            if progress:
                progress(f"context {n:,}, batch {b}")
            with torch.no_grad():
                records += measure(s, n, b)
    return records


def render(records: list[Record], s: DecodeBenchSettings, console) -> None:
    """Print one table: per (n, b) tokens/s, ms/step, memory and attention cost of both, and the ratio."""
    from rich.table import Table

    t = Table(
        title=f"decode, {s.device} {str(s.dtype).removeprefix('torch.')}: d_model {s.d_model}, "
        f"{s.n_layers} layers, {s.n_heads} heads ({s.n_kv_heads} kv), w={s.window}, "
        f"global_k={s.global_k}, B={s.block}"
    )
    for col in (
        "context",
        "batch",
        "dense tok/s",
        "MLA tok/s",
        "MLA/dense",
        "dense ms/step",
        "MLA ms/step",
        "cache MiB d/M",
        "peak MiB d/M",
        "keys/token d/M",
        "KV MiB/token d/M",
    ):
        t.add_column(col, justify="right")
    by = {(r.impl, r.context, r.batch): r for r in records}
    for n in s.contexts:
        for b in s.batches:
            d, m = by[("dense", n, b)], by[("mla", n, b)]
            t.add_row(
                f"{n:,}",
                str(b),
                f"{d.tokens_per_s:,.1f}",
                f"{m.tokens_per_s:,.1f}",
                f"{m.tokens_per_s / d.tokens_per_s:.2f}x",
                f"{d.ms_per_step:.2f}",
                f"{m.ms_per_step:.2f}",
                f"{d.cache_mib:,.0f}/{m.cache_mib:,.0f}",
                f"{d.peak_mib:,.0f}/{m.peak_mib:,.0f}",
                f"{d.keys_per_token:,.0f}/{m.keys_per_token:,.0f}",
                f"{d.kv_mib_per_token:,.2f}/{m.kv_mib_per_token:,.2f}",
            )
    console.print(t)


def main() -> None:
    """``python -m benchmarks.decode [--json]`` with the default settings."""
    import sys

    from orchestrator.cli_common import err as console

    s = DecodeBenchSettings()
    records = run_benchmark(s, progress=console.log)
    render(records, s, console)
    if "--json" in sys.argv:
        print(json.dumps([r.to_json() for r in records], indent=2))


if __name__ == "__main__":
    main()
