"""One-shot GPU check of MLA attention (run by ``benchmarks/gpu_check.sh``): recompiles, attention
timings against the fastest dense SDPA backend, kernel counts, a block-64 compile probe and a
whole-model training step of a ~1B model, dense vs MLA, at sequence 16k.

Everything goes into ``$OUT/gpu_check.json`` (rewritten atomically after every section, so a run
cut short keeps what it measured). The script is self-checking: a section that fails, a timing
whose MLA output disagrees with the fp32 reference on a prefix, or a recompile at a fixed shape
is recorded under ``failures`` and makes the exit status 1, so nothing wrong is printed as a
result.

Method (GPU-DESIGN.md §4.4 and §6):

* attention: q, k, v, gate random ``(1, H, n, d)`` in bf16; MLA with ``window=128``,
  ``global_k=16`` (one selected block of 128) through :func:`mla.attention.multi_level_attention`
  (the compiled FlexAttention core); dense = causal SDPA with each of the FLASH, cuDNN and
  EFFICIENT backends (native GQA, or k/v expanded outside the timed region when a backend refuses
  GQA); the fastest dense candidate is the baseline. Timing: CUDA events, median of ``runs``
  (>= 20) calls after ``warmup`` calls; "forward" is the forward of the autograd graph (the
  training forward; inputs require grad), "forward_backward" adds ``torch.autograd.grad``.
  Keys per query: MLA at most ``w + B + n_sel*B`` (window, own block, selected blocks), dense
  ``(n + 1) / 2`` on average.
* check: each MLA timing's output, on its first 2,048 positions (causal: they depend on no later
  token), must match the fp32 dense masked reference within relative RMS 1e-2.
* model step: preset ``1b`` (d 2048, 22 layers, 32 heads, 4 kv heads, w 512, k 128, B 128) at
  seq 16,384, micro-batch 1, bf16, through ``workers.parallel.engine.build_engine`` (DeepSpeed,
  one process, ZeRO-1) when DeepSpeed imports, else a plain torch loop (bf16 autocast + fused
  AdamW), labelled as such. tokens/s = 16,384 / median step time; MFU =
  :func:`mla.flops.training_flops_per_token` x tokens/s / 989.4 TFLOP/s (H200 bf16 dense peak,
  ``orchestrator/planner/catalogue.py``).

Run: ``python -m benchmarks.gpu_check --out DIR [--budget-s 420]``; ``--smoke`` runs every
section at toy sizes on any device (what the CPU test of this script does).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import statistics
import sys
import time
import traceback

import torch
import torch.nn.functional as F

H200_BF16_PEAK_FLOPS = 989.4e12
SHAPES = {"B1-H4-d64": (4, 4, 64), "B1-Hq16-Hkv4-d128": (16, 4, 128)}
SEQ_ORDER = (
    8192,
    65536,
    4096,
    16384,
    32768,
)  # targets (8k, 64k) first, then the model step, then the rest
WINDOW, GLOBAL_K, BLOCK = 128, 16, 128
CHECK_PREFIX, REL_RMS = 2048, 1e-2


class Report:
    """The JSON report, written atomically after each section."""

    def __init__(self, out_dir: str):
        self.path = os.path.join(out_dir, "gpu_check.json")
        self.data: dict = {"failures": [], "sections": {}}
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def fail(self, what: str) -> None:
        print(f"FAIL: {what}", flush=True)
        self.data["failures"].append(what)

    def write(self) -> None:
        tmp = self.path + ".tmp"
        with open(tmp, "w") as fh:
            json.dump(self.data, fh, indent=2, default=str)
        os.replace(tmp, self.path)


class Timer:
    """Median wall time of a callable: CUDA events on CUDA, perf_counter elsewhere."""

    def __init__(self, device: str, warmup: int, runs: int):
        self.device, self.warmup, self.runs = device, warmup, runs

    def median_ms(self, fn) -> float:
        for _ in range(self.warmup):
            fn()
        self._sync()
        times = []
        for _ in range(self.runs):
            if self.device == "cuda":
                start, end = (
                    torch.cuda.Event(enable_timing=True),
                    torch.cuda.Event(enable_timing=True),
                )
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    def _sync(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()


def rel_rms(got: torch.Tensor, want: torch.Tensor) -> float:
    """``||got - want||_2 / ||want||_2`` in fp32."""
    got, want = got.float(), want.float()
    return float((got - want).pow(2).mean().sqrt() / want.pow(2).mean().sqrt().clamp_min(1e-30))


def make_inputs(
    heads: int, kv: int, d: int, n: int, device: str, dtype: torch.dtype, seed: int = 0
):
    """q ``(1, heads, n, d)``, k, v ``(1, kv, n, d)``, gate ``(1, heads, n)``, requiring grad."""
    gen = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(1, heads, n, d, device=device, generator=gen)
    k = torch.randn(1, kv, n, d, device=device, generator=gen)
    v = torch.randn(1, kv, n, d, device=device, generator=gen)
    gate = torch.rand(1, heads, n, device=device, generator=gen)
    return [t.to(dtype).requires_grad_() for t in (q, k, v, gate)]


def mla_fn(x):
    from mla.attention import multi_level_attention

    return multi_level_attention(*x, window=WINDOW, top_k=GLOBAL_K, indexer="block", block=BLOCK)


def dense_candidates(x, device: str) -> dict:
    """Name -> callable for every dense SDPA variant that runs on these inputs."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v, _ = x
    gqa = q.shape[1] != k.shape[1]
    backends = (
        {
            "flash": SDPBackend.FLASH_ATTENTION,
            "cudnn": SDPBackend.CUDNN_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION,
        }
        if device == "cuda"
        else {"math": SDPBackend.MATH}
    )
    expanded = None
    out = {}
    for name, backend in backends.items():

        def native(backend=backend):
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)

        try:
            native()
            out[name] = (native, (q, k, v))
            continue
        except RuntimeError as err:
            if not gqa:
                print(f"  dense {name}: unavailable ({str(err).splitlines()[0][:120]})", flush=True)
                continue
        if expanded is None:
            rep = q.shape[1] // k.shape[1]
            expanded = [t.detach().repeat_interleave(rep, dim=1).requires_grad_() for t in (k, v)]

        def repeated(backend=backend, kv=expanded):
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q, kv[0], kv[1], is_causal=True)

        try:
            repeated()
            out[name + "+expanded_kv"] = (repeated, (q, *expanded))
        except RuntimeError as err:
            print(f"  dense {name}: unavailable ({str(err).splitlines()[0][:120]})", flush=True)
    return out


def pass_fn(fn, inputs, pass_: str):
    """The timed callable: forward (autograd on) or forward + ``autograd.grad``."""
    if pass_ == "forward":
        return lambda: fn()
    probe = fn()
    dout = torch.randn_like(probe)
    del probe

    def fwd_bwd():
        torch.autograd.grad(fn(), inputs, dout)

    return fwd_bwd


def check_prefix(x, out: torch.Tensor, report: Report, label: str) -> float:
    """MLA output on the first CHECK_PREFIX positions vs the fp32 dense masked reference."""
    from mla.block_selection import select_blocks
    from mla.reference import block_selection_reference_attention

    p = min(CHECK_PREFIX, out.shape[-2])
    fp = [
        t.detach()[..., :p, :].float() if t.dim() == 4 else t.detach()[..., :p].float() for t in x
    ]
    sel = select_blocks(fp[0], fp[1], GLOBAL_K, BLOCK)
    ref = block_selection_reference_attention(*fp, window=WINDOW, selection=sel, block=BLOCK)
    err = rel_rms(out[..., :p, :], ref)
    if not math.isfinite(err) or err > REL_RMS:
        report.fail(
            f"{label}: MLA output vs fp32 reference on the first {p} positions: rel RMS {err:.3g}"
        )
    return err


def unique_graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def bench_attention(report: Report, args, device: str, dtype, seq_lens, until_s: float) -> None:
    """Dense (fastest backend) vs MLA per shape, n and pass; CUDA-graph variant at small n.
    A (shape, n) is skipped (and listed) once ``until_s`` seconds have passed."""
    timer = Timer(device, args.warmup, args.runs)
    rows = report.data["sections"].setdefault("attention", {"rows": [], "skipped": []})
    n_sel = -(-GLOBAL_K // BLOCK)
    for n in seq_lens:
        for shape, (heads, kv, d) in args.shapes.items():
            if report.elapsed() > until_s:
                rows["skipped"].append(f"{shape} n={n}: time budget")
                continue
            x = make_inputs(heads, kv, d, n, device, dtype)
            graphs0, t0 = unique_graphs(), time.perf_counter()
            out = mla_fn(x).detach()  # autograd on: the same compiled graph as training
            check = check_prefix(x, out, report, f"{shape} n={n}")
            mla = functools.partial(mla_fn, x)
            pass_fn(mla, x, "forward_backward")()
            compile_s = time.perf_counter() - t0
            base = unique_graphs()
            cands = dense_candidates(x, device)
            for pass_ in ("forward", "forward_backward"):
                dense = {
                    name: timer.median_ms(pass_fn(f, inp, pass_))
                    for name, (f, inp) in cands.items()
                }
                mla_ms = timer.median_ms(pass_fn(mla, x, pass_))
                best = min(dense, key=dense.get)
                row = {
                    "shape": shape,
                    "n": n,
                    "pass": pass_,
                    "dense_ms": dense,
                    "dense_best": best,
                    "mla_ms": round(mla_ms, 4),
                    "ratio_dense_over_mla": round(dense[best] / mla_ms, 3),
                    "keys_per_query_mla_max": WINDOW + BLOCK + n_sel * BLOCK,
                    "keys_per_query_dense_mean": (n + 1) / 2,
                    "mla_prefix_rel_rms": check,
                    "compile_s": round(compile_s, 1),
                    "graphs_compiled": base - graphs0,
                }
                rows["rows"].append(row)
                print(
                    f"{shape:18s} n={n:6d} {pass_:16s} dense[{best}] {dense[best]:8.3f} ms  MLA "
                    f"{mla_ms:8.3f} ms  dense/MLA {row['ratio_dense_over_mla']:6.2f}x  keys/query MLA <= "
                    f"{row['keys_per_query_mla_max']} vs dense {row['keys_per_query_dense_mean']:.0f}",
                    flush=True,
                )
            if unique_graphs() != base:
                report.fail(
                    f"{shape} n={n}: {unique_graphs() - base} recompiles while timing a fixed shape"
                )
            if n in args.cuda_graph_seq_lens and device == "cuda":
                rows["rows"].extend(_cuda_graph_rows(x, shape, n, timer, report))
            x = out = cands = mla = None  # free this size before the next one
            report.write()


def _cuda_graph_rows(x, shape: str, n: int, timer: Timer, report: Report) -> list[dict]:
    """MLA compiled with ``mode="reduce-overhead"`` (CUDA graphs), same inputs."""
    from mla.flex_attention import CUDA_GRAPHS_ENV

    os.environ[CUDA_GRAPHS_ENV] = "1"
    rows = []
    try:

        def step(pass_):
            inner = pass_fn(lambda: mla_fn(x), x, pass_)

            def run():
                torch.compiler.cudagraph_mark_step_begin()
                inner()

            return run

        for pass_ in ("forward", "forward_backward"):
            ms = timer.median_ms(step(pass_))
            rows.append({"shape": shape, "n": n, "pass": pass_, "mla_cuda_graphs_ms": round(ms, 4)})
            print(f"{shape:18s} n={n:6d} {pass_:16s} MLA with CUDA graphs {ms:8.3f} ms", flush=True)
    except Exception as err:  # recorded, not fatal: the default mode is the one that must work
        rows.append({"shape": shape, "n": n, "mla_cuda_graphs_error": repr(err)[:400]})
        print(f"CUDA graphs variant failed: {err!r}"[:300], flush=True)
    finally:
        os.environ.pop(CUDA_GRAPHS_ENV, None)
    return rows


def recompile_check(report: Report, device: str, dtype, n: int) -> None:
    """Five training-like calls at one shape after the first: no new graph may be compiled."""
    x = make_inputs(4, 4, 64, n, device, dtype, seed=0)
    step = pass_fn(lambda: mla_fn(x), x, "forward_backward")
    g0 = unique_graphs()
    step()
    first = unique_graphs() - g0
    for seed in range(1, 6):
        with torch.no_grad():
            for t, new in zip(x, make_inputs(4, 4, 64, n, device, dtype, seed=seed), strict=False):
                t.copy_(new)
        step()
    again = unique_graphs() - g0 - first
    report.data["sections"]["recompiles"] = {
        "n": n,
        "graphs_first_call": first,
        "graphs_later_calls": again,
    }
    print(f"recompiles: first call compiled {first} graph(s), 5 later calls {again}", flush=True)
    if again:
        report.fail(f"{again} recompiles over 5 steps at a fixed shape")


def kernel_counts(report: Report, device: str, dtype, n: int) -> None:
    """CUDA kernels launched by one forward+backward of MLA and of dense SDPA (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    heads, kv, d = SHAPES["B1-Hq16-Hkv4-d128"]
    x = make_inputs(heads, kv, d, n, device, dtype)
    counts = {}
    for name, fn, inputs in [
        ("mla", lambda: mla_fn(x), x),
        (
            "dense",
            lambda: F.scaled_dot_product_attention(
                x[0], x[1], x[2], is_causal=True, enable_gqa=True
            ),
            x[:3],
        ),
    ]:
        step = pass_fn(fn, inputs, "forward_backward")
        step()
        activities = [ProfilerActivity.CUDA] if device == "cuda" else [ProfilerActivity.CPU]
        with profile(activities=activities) as prof:
            step()
        kind = "cuda" if device == "cuda" else "cpu"
        events = [
            e
            for e in prof.events()
            if getattr(e, "device_type", None) is not None
            and str(e.device_type).lower().endswith(kind)
        ]
        counts[name] = {
            "kernels": len(events),
            "top": [
                (e.key, e.count) for e in sorted(prof.key_averages(), key=lambda e: -e.count)[:12]
            ],
        }
    report.data["sections"]["kernel_counts"] = {"n": n, "shape": "B1-Hq16-Hkv4-d128", **counts}
    print(
        f"kernels per forward+backward at n={n}: MLA {counts['mla']['kernels']}, "
        f"dense {counts['dense']['kernels']}",
        flush=True,
    )


def block64_probe(report: Report, device: str, dtype, n: int) -> None:
    """Does the compiled core build and run backward with 64-token BlockMasks (§5)?"""
    from mla.flex_attention import mla_core, window_block_mask

    x = make_inputs(4, 4, 64, n, device, dtype)
    result: dict = {"n": n}
    for opts in (None, {"BLOCK_M": 64, "BLOCK_N": 64}):
        key = "default" if opts is None else "BLOCK_M=N=64"
        try:
            from torch.nn.attention.flex_attention import flex_attention

            flex = (
                flex_attention
                if opts is None
                else functools.partial(flex_attention, kernel_options=opts)
            )
            core = torch.compile(
                functools.partial(mla_core, flex=flex), fullgraph=True, dynamic=False
            )
            out = core(*x, window_block_mask(n, WINDOW, 64, device), top_k=GLOBAL_K, block=64)
            torch.autograd.grad(out.float().sum(), x)
            result[key] = "forward+backward ok"
        except Exception as err:
            text = f"{type(err).__name__}: {err}"
            result[key] = text if len(text) < 900 else text[:300] + " ... " + text[-600:]
    report.data["sections"]["block64_probe"] = result
    print(f"block-64 probe: {result}", flush=True)


def model_step(report: Report, args, device: str) -> None:
    """~1B model training step, dense vs MLA, seq 16k, bf16 (DeepSpeed engine if importable)."""
    import numpy as np

    from mla.config import get_preset
    from mla.flops import count_parameters, training_flops_per_token

    seq = args.model_seq
    base = get_preset("1b") if not args.smoke else get_preset("tiny").replace(block_size=16)
    base = base.replace(max_seq_len=seq)
    result: dict = {"seq_len": seq, "micro_batch": 1, "params": count_parameters(base)}
    try:
        import deepspeed  # noqa: F401

        engine_kind = "deepspeed"
    except ImportError:
        engine_kind = "torch (DeepSpeed not importable on this machine)"
    result["engine"] = engine_kind
    for attention in ("dense", "mla"):
        if report.elapsed() > args.budget_s * 0.7:
            result[attention] = "skipped: time budget"
            continue
        cfg = base.replace(attention=attention)
        step = (
            _deepspeed_step(cfg, device) if engine_kind == "deepspeed" else _torch_step(cfg, device)
        )
        rng = np.random.default_rng(0)
        times, losses = [], []
        for i in range(args.model_warmup + args.model_steps):
            x = rng.integers(0, cfg.vocab_size, size=(1, seq + 1))
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            losses.append(step(x[:, :-1], x[:, 1:]))
            if device == "cuda":
                torch.cuda.synchronize()
            if i >= args.model_warmup:
                times.append(time.perf_counter() - t0)
        step_s = statistics.median(times)
        tok_s = seq / step_s
        mfu = training_flops_per_token(cfg, seq) * tok_s / H200_BF16_PEAK_FLOPS
        result[attention] = {
            "step_s": round(step_s, 4),
            "tokens_per_s": round(tok_s, 1),
            "mfu": round(mfu, 4),
            "losses": [round(v, 4) for v in losses],
            "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)
            if device == "cuda"
            else None,
        }
        if not all(math.isfinite(v) for v in losses):
            report.fail(f"model step {attention}: non-finite loss {losses}")
        print(
            f"1B step seq {seq} {attention:5s}: {step_s:.3f} s, {tok_s:,.0f} tok/s, MFU {100 * mfu:.1f}% "
            f"({engine_kind})",
            flush=True,
        )
        del step
        if device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
    if isinstance(result.get("dense"), dict) and isinstance(result.get("mla"), dict):
        result["tokens_per_s_ratio_mla_over_dense"] = round(
            result["mla"]["tokens_per_s"] / result["dense"]["tokens_per_s"], 3
        )
        print(
            f"1B training tokens/s MLA / dense = {result['tokens_per_s_ratio_mla_over_dense']}x",
            flush=True,
        )
    report.data["sections"]["model_step"] = result


def _deepspeed_step(cfg, device: str):
    import deepspeed
    import torch.distributed as dist

    from orchestrator.contract.layout import Layout
    from workers.parallel.engine import build_engine

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29517")
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        deepspeed.init_distributed(dist_backend="nccl" if device == "cuda" else "gloo")
    ds_config = {
        "train_batch_size": 1,
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "steps_per_print": 10**9,
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": 3e-4,
                "betas": [0.9, 0.95],
                "eps": 1e-8,
                "weight_decay": 0.1,
                "torch_adam": True,
            },
        },
        "zero_optimization": {"stage": 1},
        "bf16": {"enabled": device == "cuda"},
    }
    engine = build_engine(
        Layout(dp=1, zero_stage=1),
        ds_config,
        cfg,
        seed=0,
        weight_decay=0.1,
        device=torch.device(device),
    )
    return lambda x, y: engine.train_batch(x, y)


def _torch_step(cfg, device: str):
    from mla.model import MLATransformer

    torch.manual_seed(0)
    model = MLATransformer(cfg).to(device)
    opt = torch.optim.AdamW(
        model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=device == "cuda"
    )

    def step(x, y):
        x, y = torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            logits = model(x)
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return float(loss)

    return step


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    p.add_argument(
        "--budget-s", type=float, default=420.0, help="stop starting new sections after this"
    )
    p.add_argument(
        "--smoke", action="store_true", help="toy sizes on any device (checks the script)"
    )
    args = p.parse_args(argv)
    if args.smoke:
        global WINDOW, GLOBAL_K, BLOCK, CHECK_PREFIX
        WINDOW, GLOBAL_K, BLOCK, CHECK_PREFIX = 16, 8, 16, 64
        args.shapes = {"B1-H4-d16": (4, 4, 16), "B1-Hq4-Hkv2-d16": (4, 2, 16)}
        args.seq_lens, args.cuda_graph_seq_lens = (256, 128), (128,)
        args.warmup, args.runs, args.model_seq, args.model_warmup, args.model_steps = 1, 3, 64, 1, 2
        args.recompile_n, args.profile_n, args.probe_n = 128, 128, 128
    else:
        args.shapes, args.seq_lens, args.cuda_graph_seq_lens = SHAPES, SEQ_ORDER, (4096, 8192)
        args.warmup, args.runs, args.model_seq, args.model_warmup, args.model_steps = (
            3,
            20,
            16384,
            2,
            5,
        )
        args.recompile_n, args.profile_n, args.probe_n = 4096, 8192, 4096
    return args


def main(argv: list[str] | None = None) -> int:
    """Run every section; returns 0 when nothing failed, else 1."""
    args = parse(sys.argv[1:] if argv is None else argv)
    os.makedirs(args.out, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device != "cuda" and not args.smoke:
        print("FAIL: no CUDA device (use --smoke to check the script on CPU)", flush=True)
        return 1
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    report = Report(args.out)
    report.data["env"] = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": device,
        "name": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "smoke": args.smoke,
        "window": WINDOW,
        "global_k": GLOBAL_K,
        "block": BLOCK,
    }
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    sections = [
        ("recompiles", lambda: recompile_check(report, device, dtype, args.recompile_n)),
        (
            "attention",
            lambda: bench_attention(
                report, args, device, dtype, args.seq_lens[:2], 0.45 * args.budget_s
            ),
        ),
        ("model_step", lambda: model_step(report, args, device)),
        (
            "attention",
            lambda: bench_attention(
                report, args, device, dtype, args.seq_lens[2:], 0.85 * args.budget_s
            ),
        ),
        ("kernel_counts", lambda: kernel_counts(report, device, dtype, args.profile_n)),
        ("block64_probe", lambda: block64_probe(report, device, dtype, args.probe_n)),
    ]
    for name, run in sections:
        if name in ("kernel_counts", "block64_probe") and report.elapsed() > args.budget_s:
            report.data["sections"][name] = "skipped: time budget"
            continue
        print(f"== {name} (t={report.elapsed():.0f} s)", flush=True)
        try:
            run()
        except Exception:
            report.fail(f"section {name} raised:\n{traceback.format_exc()[-2000:]}")
        report.data["elapsed_s"] = round(report.elapsed(), 1)
        report.write()
    status = "FAILED" if report.data["failures"] else "OK"
    print(
        f"gpu_check {status} in {report.elapsed():.0f} s; {len(report.data['failures'])} failure(s); "
        f"JSON at {report.path}",
        flush=True,
    )
    return 1 if report.data["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
