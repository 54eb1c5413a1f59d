"""``mla bench``: benchmarks of the model library (torch is imported only inside commands).

The benchmark code lives in the checkout's ``benchmarks/`` folder, which is not installed (a
generic top-level name must not land in site-packages); :func:`load_benchmark` imports it from
the checkout this package runs from, so ``mla bench`` works from a clone (editable install or
``python -m orchestrator.cli``) and says so elsewhere.
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Optional

import typer

from orchestrator.contract.errors import ConfigError

app = typer.Typer(
    name="bench", help="Benchmarks (attention, quality, retrieval, decoding).", no_args_is_help=True
)

#: The source checkout, if this package runs from one (``benchmarks/`` sits beside it).
CHECKOUT = Path(__file__).resolve().parents[1]


def load_benchmark(name: str) -> ModuleType:
    """``benchmarks.<name>`` from the source checkout.

    Raises:
        ConfigError: not running from a checkout (no ``benchmarks/`` beside the package).
    """
    if not (CHECKOUT / "benchmarks" / "__init__.py").is_file():
        raise ConfigError(
            f"mla bench runs from a source checkout (no benchmarks/ folder in {CHECKOUT}); "
            "clone the repository and run it there"
        )
    if str(CHECKOUT) not in sys.path:
        sys.path.insert(0, str(CHECKOUT))
    return importlib.import_module(f"benchmarks.{name}")


@app.command()
def attention(
    json_out: bool = typer.Option(False, "--json", help="Print the records as JSON to stdout."),
    seq_lens: str = typer.Option(
        "1024,2048,4096,8192,16384", "--seq-lens", help="Comma-separated n, in tokens."
    ),
    window: int = typer.Option(128, "--window", min=1, help="Local sliding window w, in tokens."),
    top_k: int = typer.Option(
        16, "--top-k", min=1, help="global_k: earlier-key budget, rounded up to whole blocks."
    ),
    block: int = typer.Option(
        64,
        "--block",
        min=1,
        help="Block size of the local path and the block selection, in tokens.",
    ),
    repeats: int = typer.Option(
        3, "--repeats", min=1, help="Timed runs per measurement (after one warm-up)."
    ),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda."),
    threads: Optional[int] = typer.Option(
        None, "--threads", min=1, help="CPU intra-op threads (default: torch's)."
    ),
    no_memory: bool = typer.Option(False, "--no-memory", help="Skip the peak-memory measurement."),
) -> None:
    """Dense causal SDPA vs MLA attention core: median time, peak memory, ratios, growth exponent."""
    from orchestrator.cli_common import err as console

    settings = _settings(seq_lens, window, top_k, block, repeats, device, threads, not no_memory)
    bench = load_benchmark("attention")

    records = bench.run_benchmark(settings, progress=lambda msg: console.log(msg))
    bench.render(records, settings, console)
    if json_out:
        print(json.dumps([r.to_json() for r in records], indent=2))


def _settings(
    seq_lens: str,
    window: int,
    top_k: int,
    block: int,
    repeats: int,
    device: str,
    threads: Optional[int],
    memory: bool,
):
    """Validate the options and build the benchmark settings (imports torch)."""
    try:
        lens = tuple(int(x) for x in seq_lens.split(",") if x.strip())
    except ValueError:
        raise ConfigError(
            f"--seq-lens={seq_lens!r} must be comma-separated integers, e.g. 1024,2048"
        ) from None
    if not lens or min(lens) < 1:
        raise ConfigError(f"--seq-lens={seq_lens!r} must list positive lengths, e.g. 1024,2048")
    if device not in ("cpu", "cuda"):
        raise ConfigError(f"--device={device!r} must be 'cpu' or 'cuda'")
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device=cuda but torch sees no CUDA device; use --device cpu")
    return load_benchmark("attention").AttentionBenchSettings(
        seq_lens=lens,
        window=window,
        top_k=top_k,
        block=block,
        repeats=repeats,
        device=device,
        threads=threads,
        memory=memory,
    )


@app.command()
def quality(
    json_out: bool = typer.Option(False, "--json", help="Print the report as JSON to stdout."),
    steps: int = typer.Option(
        None, "--steps", min=1, help="Optimizer steps per model (default: the benchmark's)."
    ),
    threads: Optional[int] = typer.Option(
        None, "--threads", min=1, help="CPU intra-op threads (default: torch's)."
    ),
    models: str = typer.Option(
        "dense,mla,window",
        "--models",
        help="Comma-separated models, dense first, among dense, mla, window (global branch "
        "off), sum (MLA with the branches summed, no gate).",
    ),
    processes: int = typer.Option(
        1, "--processes", min=1, help="Models trained at once, each in its own process."
    ),
) -> None:
    """Train dense, MLA and window-only versions of one small LM on the same tokens; compare
    validation loss, overall and by position."""
    import dataclasses

    from orchestrator.cli_common import err as console

    bench = load_benchmark("quality")
    kinds = tuple(m.strip() for m in models.split(",") if m.strip())
    if not kinds or kinds[0] != "dense" or any(m not in bench.MODEL_KINDS for m in kinds):
        raise ConfigError(
            f"--models={models!r} must start with dense and name only "
            f"{', '.join(bench.MODEL_KINDS)}, e.g. dense,mla,window"
        )
    settings = bench.QualitySettings(threads=threads, models=kinds, processes=processes)
    if steps is not None:
        settings = dataclasses.replace(settings, steps=steps)
    report = bench.run_quality(settings, log=console.log)
    bench.render(report, console)
    if json_out:
        print(json.dumps(report, indent=2))


@app.command()
def retrieval(
    json_out: bool = typer.Option(False, "--json", help="Print the report as JSON to stdout."),
    steps: int = typer.Option(
        None, "--steps", min=1, help="Optimizer steps per model (default: the benchmark's)."
    ),
    threads: Optional[int] = typer.Option(
        None, "--threads", min=1, help="CPU intra-op threads (default: torch's)."
    ),
    plot: Optional[Path] = typer.Option(
        None, "--plot", help="Write accuracy against distance as a PNG to this path."
    ),
) -> None:
    """Passkey retrieval by distance: dense vs window-only vs MLA of the same size, same tokens."""
    import dataclasses

    from orchestrator.cli_common import err as console

    if plot is not None and not plot.parent.is_dir():
        raise ConfigError(f"--plot={plot}: folder {plot.parent} does not exist; create it first")
    bench = load_benchmark("retrieval")
    settings = bench.RetrievalSettings(threads=threads)
    if steps is not None:
        settings = dataclasses.replace(settings, steps=steps)
    report = bench.run_retrieval(settings, log=console.log)
    bench.render(report, console)
    if plot is not None:
        bench.plot(report, str(plot))
    if json_out:
        print(json.dumps(report, indent=2))


@app.command()
def decode(
    json_out: bool = typer.Option(False, "--json", help="Print the records as JSON to stdout."),
    contexts: str = typer.Option(
        "1024,4096,16384,65536", "--contexts", help="Comma-separated cached tokens n."
    ),
    batches: str = typer.Option("1,8", "--batches", help="Comma-separated batch sizes."),
    tokens: int = typer.Option(
        64, "--tokens", min=1, help="Timed new tokens (rounded up to a multiple of --block)."
    ),
    window: int = typer.Option(128, "--window", min=1, help="Local sliding window w, in tokens."),
    global_k: int = typer.Option(
        64, "--global-k", min=1, help="Global-branch budget (ceil(k / block) blocks)."
    ),
    block: int = typer.Option(64, "--block", min=1, help="Block size B, in tokens."),
    device: str = typer.Option("cpu", "--device", help="cpu (fp32) or cuda (bf16)."),
    threads: Optional[int] = typer.Option(
        None, "--threads", min=1, help="CPU intra-op threads (default: torch's)."
    ),
) -> None:
    """Incremental decoding with the KV cache: MLA vs the same model with dense attention, side by side."""
    from orchestrator.cli_common import err as console

    bench = load_benchmark("decode")
    ctx, bs = _int_list("--contexts", contexts), _int_list("--batches", batches)
    _check_device(device)
    settings = bench.DecodeBenchSettings(
        contexts=ctx,
        batches=bs,
        tokens=tokens,
        window=window,
        global_k=global_k,
        block=block,
        device=device,
        threads=threads,
    )
    records = bench.run_benchmark(settings, progress=lambda msg: console.log(msg))
    bench.render(records, settings, console)
    if json_out:
        print(json.dumps([r.to_json() for r in records], indent=2))


def _int_list(option: str, text: str) -> tuple[int, ...]:
    example = {"--batches": "1,8"}.get(option, "1024,4096")
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ConfigError(
            f"{option}={text!r} must be comma-separated integers, e.g. {example}"
        ) from None
    if not values or min(values) < 1:
        raise ConfigError(f"{option}={text!r} must list positive integers, e.g. {example}")
    return values


def _check_device(device: str) -> None:
    if device not in ("cpu", "cuda"):
        raise ConfigError(f"--device={device!r} must be 'cpu' or 'cuda'")
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device=cuda but torch sees no CUDA device; use --device cpu")
