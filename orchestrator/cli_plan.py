"""``mla plan``: choose a data x tensor x pipeline layout and print its memory and speed.

Human tables go to stdout (rich); ``--json`` prints one JSON document to stdout instead. User
errors are :class:`orchestrator.contract.errors.PlanError`, printed by ``orchestrator.cli.main``.
"""

from __future__ import annotations

import json
from typing import Optional

import typer

from orchestrator.cli_common import err, out
from orchestrator.contract.errors import PlanError
from orchestrator.contract.layout import RECOMPUTE_CHOICES

app = typer.Typer()

_MODEL = "Model (one of --model, --params, --config, or explicit dims)"
_CLUSTER = "Cluster"
_PIN = "Pin layout fields"


def build_model(model: str | None, params: str | None, config: str | None, dims: dict):
    """ModelConfig and default seq_len from exactly one model source.

    ``--attention``, ``--window``, ``--top-k`` and ``--seq-len`` apply to every source; the
    shape flags (``--layers``, ``--heads``...) only to explicit dims.

    Raises:
        PlanError: none or several sources, a shape flag with a named source, an unknown
            preset, incomplete explicit dims, or attention flags that do not fit together.
    """
    from mla.config import PRESETS, ModelConfig

    explicit = {k: v for k, v in dims.items() if v is not None}
    given = [
        name for name, v in (("--model", model), ("--params", params), ("--config", config)) if v
    ]
    if explicit.get("layers") or explicit.get("hidden"):
        given.append("explicit dims")
    if len(given) != 1:
        raise PlanError(
            f"give exactly one model source, got {given or 'none'}: --model NAME "
            f"({', '.join(PRESETS)}), --params 70B, --config FILE, or --layers/--hidden/--heads/--vocab"
        )
    if given[0] != "explicit dims":
        shape = [f"--{k.replace('_', '-')}" for k in _SHAPE_FLAGS if explicit.get(k) is not None]
        if shape:
            raise PlanError(
                f"{', '.join(shape)} cannot be combined with {given[0]} (it fixes the model's "
                "shape): drop it, or give the whole shape with --layers/--hidden/--heads/--vocab"
            )
        base, job_seq = _named_model(model, params, config, dims.get("seq_len"))
        return apply_attention_flags(base, explicit), job_seq
    missing = [f"--{k}" for k in ("layers", "hidden", "heads", "vocab") if not explicit.get(k)]
    if missing:
        raise PlanError(f"explicit model dims need {', '.join(missing)}")
    h = explicit["hidden"]
    try:
        cfg = ModelConfig(
            vocab_size=explicit["vocab"],
            d_model=h,
            n_layers=explicit["layers"],
            n_heads=explicit["heads"],
            n_kv_heads=explicit.get("kv_heads"),
            ffn_hidden=explicit.get("ffn_hidden") or round(8 * h / 3),
            max_seq_len=explicit.get("seq_len") or 4096,
            attention=explicit.get("attention") or "dense",
            local_window=explicit.get("window") or 1024,
            global_k=explicit.get("top_k") or 256,
        )
    except ValueError as exc:
        raise PlanError(str(exc)) from None
    return cfg, None


_SHAPE_FLAGS = ("layers", "hidden", "heads", "kv_heads", "ffn_hidden", "vocab")


def _named_model(model: str | None, params: str | None, config: str | None, seq_len: int | None):
    """ModelConfig and the job's seq_len (``--config`` only) of a preset, a count or a job YAML.

    Raises:
        PlanError: an unknown preset or an unparsable count.
    """
    from mla.config import PRESETS

    if model:
        if model not in PRESETS:
            raise PlanError(f"unknown model preset {model!r}; known presets: {', '.join(PRESETS)}")
        return PRESETS[model], None
    if params:
        from orchestrator.planner.shapes import model_from_params

        return model_from_params(params, seq_len=seq_len or 4096), None
    from orchestrator.config import load_job_config

    job = load_job_config(str(config))
    return job.model_config_(), job.data.seq_len


def apply_attention_flags(cfg, flags: dict):
    """``cfg`` with ``--attention``, ``--window``, ``--top-k`` and ``--seq-len`` applied.

    ``--window`` or ``--top-k`` without ``--attention`` selects MLA attention (they only mean
    something there). ``--seq-len`` longer than the model's ``max_seq_len`` raises it.

    Raises:
        PlanError: ``--window``/``--top-k`` with ``--attention dense``, or a window / top-k
            longer than the sequence.
    """
    changes: dict = {}
    mla_flags = [f"--{k.replace('_', '-')}" for k in ("window", "top_k") if flags.get(k)]
    attention = flags.get("attention")
    if mla_flags and attention == "dense":
        raise PlanError(
            f"{' and '.join(mla_flags)} {'apply' if len(mla_flags) > 1 else 'applies'} only to --attention mla (dense attention has no "
            "sliding window or top-k): drop them or use --attention mla"
        )
    if attention or mla_flags:
        changes["attention"] = attention or "mla"
    seq = flags.get("seq_len") or cfg.max_seq_len
    for key, field in (("window", "local_window"), ("top_k", "global_k")):
        value = flags.get(key)
        if value is None:
            continue
        if value > seq:
            raise PlanError(
                f"--{key.replace('_', '-')} {value} is longer than the sequence ({seq} tokens): "
                f"give at most {seq}"
            )
        changes[field] = value
    if seq > cfg.max_seq_len:
        changes["max_seq_len"] = seq
    if not changes:
        return cfg
    try:
        return cfg.replace(**changes)
    except ValueError as exc:
        raise PlanError(str(exc)) from None


def check_plan_numbers(**values: float | None) -> None:
    """Refuse impossible numbers before planning: counts >= 1, rates and sizes finite and > 0,
    ``--efficiency`` in (0, 1].

    Raises:
        PlanError: naming the option, the value and the allowed range.
    """
    import math

    for name, value in values.items():
        if value is None:
            continue
        option = "--" + name.replace("_", "-")
        if not math.isfinite(value):
            raise PlanError(f"{option} {value}: give a finite number")
        if name in ("gpus", "gpus_per_node", "global_batch") and value < 1:
            raise PlanError(f"{option} {value}: must be at least 1")
        if name == "efficiency" and not 0 < value <= 1:
            raise PlanError(
                f"{option} {value}: the achievable fraction of peak must be in (0, 1], e.g. 0.5"
            )
        if value <= 0:
            raise PlanError(f"{option} {value}: must be greater than 0")


def parse_zero_stages(text: str | None) -> tuple | None:
    """``"0,1"`` → ``(0, 1)``; ``None`` → ``None``.

    Raises:
        PlanError: an entry is not an integer (range checks are ``PlanRequest``'s).
    """
    if text is None:
        return None
    try:
        stages = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        stages = ()
    if not stages or any(s not in (0, 1, 2, 3) for s in stages):
        raise PlanError(
            f"--zero-stages {text!r} must be comma-separated ZeRO stages among 0, 1, 2, 3, e.g. 0,1"
        )
    return stages


def check_node_size(gpus: int, gpus_per_node: int | None, zero: int | None, stages) -> None:
    """Refuse a GPU count that does not fill whole nodes and a pinned ``--zero`` outside
    ``--zero-stages``; note a single partly used node on stderr.

    Raises:
        PlanError: naming the flags and counts that would work.
    """
    if gpus_per_node is not None and gpus > gpus_per_node and gpus % gpus_per_node:
        below = gpus - gpus % gpus_per_node
        raise PlanError(
            f"--gpus {gpus} is not a multiple of --gpus-per-node {gpus_per_node} (nodes are "
            f"used whole): give --gpus {below} or {below + gpus_per_node}, or a --gpus-per-node "
            f"that divides {gpus}"
        )
    if gpus_per_node is not None and gpus < gpus_per_node:
        err.print(
            f"note: --gpus {gpus} uses {gpus} of one {gpus_per_node}-GPU node",
            markup=False,
            highlight=False,
        )
    if zero is not None and stages is not None and zero not in stages:
        raise PlanError(
            f"--zero {zero} is not among --zero-stages {','.join(map(str, stages))}: pin one of "
            "those or widen --zero-stages"
        )


def print_result(result, top: int) -> None:
    """Rich tables: best layouts, rejected ones, or the pinned estimate."""
    from rich.table import Table

    from orchestrator.planner.shapes import describe_model

    console = out
    req = result.request
    console.print(
        f"[bold]{describe_model(req.model)}[/] on {req.gpus} x {req.gpu_spec.name} "
        f"({req.gpu_spec.memory_gib:g} GiB, {req.node_size}/node), batch {req.global_batch} x {req.seq_len}, "
        f"{req.precision}",
        markup=True,
    )
    rows = [result.estimate] if result.estimate else result.candidates[:top]
    table = Table(
        title="estimate"
        if result.estimate
        else f"best {len(rows)} of {len(result.candidates)} layouts"
    )
    for col in (
        "dp",
        "tp",
        "pp",
        "zero",
        "mb",
        "ga",
        "recompute",
        "sp",
        "v",
        "params",
        "grads",
        "optim",
        "acts",
        "buffers",
        "total GiB",
        "fits",
        "step s",
        "80% range s",
        "tokens/s",
        "TFLOP/s",
        "MFU",
    ):
        table.add_column(col, justify="right")
    for c in rows:
        lay, est, mem = c.layout, c.estimate, c.estimate.memory.gib()
        table.add_row(
            *map(
                str,
                (
                    lay.dp,
                    lay.tp,
                    lay.pp,
                    lay.zero_stage,
                    lay.micro_batch,
                    lay.grad_accum,
                    lay.recompute,
                    "y" if lay.sequence_parallel else "",
                    lay.virtual_stages,
                    mem["parameters"],
                    mem["gradients"],
                    mem["optimizer"],
                    mem["activations"],
                    mem["buffers"],
                    mem["total"],
                    "yes" if est.fits else "NO",
                    f"{est.step_time_s:.3g}",
                    "{:.3g}-{:.3g}".format(*est.step_time_interval_s),
                    f"{est.tokens_per_s:,.0f}",
                    f"{est.tflops_per_gpu:.1f}",
                    f"{100 * est.mfu:.1f}%",
                ),
            )
        )
    console.print(table)
    if result.best and not result.estimate:
        console.print(f"chosen: {result.best.reason}", highlight=False)
    if result.rejected:
        rej = Table(title=f"rejected ({len(result.rejected)})")
        rej.add_column("layout")
        rej.add_column("reason")
        for r in result.rejected[:top]:
            rej.add_row(
                " ".join(f"{k}={v}" for k, v in r.layout.items() if k != "sequence_parallel"),
                r.reason,
            )
        console.print(rej)
    for note in result.notes:
        console.print(f"note: {note}", highlight=False)
    if result.close_call:
        console.print(f"close call: {result.close_call}", highlight=False)
    console.print(
        "TFLOP/s and MFU count model FLOPs (6N + attention, PaLM App. B), not recomputation. "
        "80% range: the step time the calibration residuals expect (benchmarks/planner.py)."
    )


@app.command()
def plan(
    model: Optional[str] = typer.Option(
        None, "--model", help="Preset name (tiny, small, 1b, 7b, 13b, 70b).", rich_help_panel=_MODEL
    ),
    params: Optional[str] = typer.Option(
        None,
        "--params",
        help="Parameter count, e.g. 70B (standard shape rules).",
        rich_help_panel=_MODEL,
    ),
    config: Optional[str] = typer.Option(
        None, "--config", help="Job YAML (model, seq_len, batch, pins).", rich_help_panel=_MODEL
    ),
    layers: Optional[int] = typer.Option(None, "--layers", min=1, rich_help_panel=_MODEL),
    hidden: Optional[int] = typer.Option(None, "--hidden", min=1, rich_help_panel=_MODEL),
    heads: Optional[int] = typer.Option(None, "--heads", min=1, rich_help_panel=_MODEL),
    kv_heads: Optional[int] = typer.Option(None, "--kv-heads", min=1, rich_help_panel=_MODEL),
    ffn_hidden: Optional[int] = typer.Option(
        None, "--ffn-hidden", min=1, help="Default 8h/3.", rich_help_panel=_MODEL
    ),
    vocab: Optional[int] = typer.Option(None, "--vocab", min=2, rich_help_panel=_MODEL),
    seq_len: Optional[int] = typer.Option(
        None, "--seq-len", min=1, help="Tokens per sequence.", rich_help_panel=_MODEL
    ),
    attention: Optional[str] = typer.Option(
        None, "--attention", help="dense or mla.", rich_help_panel=_MODEL
    ),
    window: Optional[int] = typer.Option(None, "--window", min=1, rich_help_panel=_MODEL),
    top_k: Optional[int] = typer.Option(None, "--top-k", min=1, rich_help_panel=_MODEL),
    gpus: Optional[int] = typer.Option(
        None, "--gpus", help="Number of GPUs N.", rich_help_panel=_CLUSTER
    ),
    gpu: str = typer.Option(
        "a100-80gb",
        "--gpu",
        help="Catalogue name (a100-40gb, a100-80gb, h100, h200, l4, t4, cpu).",
        rich_help_panel=_CLUSTER,
    ),
    gpus_per_node: Optional[int] = typer.Option(None, "--gpus-per-node", rich_help_panel=_CLUSTER),
    peak_tflops: Optional[float] = typer.Option(
        None, "--peak-tflops", help="Custom dense peak for --precision.", rich_help_panel=_CLUSTER
    ),
    memory_gib: Optional[float] = typer.Option(
        None, "--memory-gib", help="Custom GPU memory.", rich_help_panel=_CLUSTER
    ),
    intra_node_gbs: Optional[float] = typer.Option(
        None, "--intra-node-gbs", rich_help_panel=_CLUSTER
    ),
    inter_node_gbs: Optional[float] = typer.Option(
        None, "--inter-node-gbs", rich_help_panel=_CLUSTER
    ),
    global_batch: Optional[int] = typer.Option(
        None, "--global-batch", help="Sequences per step.", rich_help_panel=_CLUSTER
    ),
    precision: str = typer.Option(
        "bf16", "--precision", help="bf16, fp16 or fp32.", rich_help_panel=_CLUSTER
    ),
    efficiency: Optional[float] = typer.Option(
        None, "--efficiency", help="Achievable fraction of peak.", rich_help_panel=_CLUSTER
    ),
    dp: Optional[int] = typer.Option(None, "--dp", min=1, rich_help_panel=_PIN),
    tp: Optional[int] = typer.Option(None, "--tp", min=1, rich_help_panel=_PIN),
    pp: Optional[int] = typer.Option(None, "--pp", min=1, rich_help_panel=_PIN),
    zero: Optional[int] = typer.Option(None, "--zero", min=0, max=3, rich_help_panel=_PIN),
    zero_stages: Optional[str] = typer.Option(
        None,
        "--zero-stages",
        help="ZeRO stages the framework offers, e.g. 0,1 for Megatron-LM (default: DeepSpeed's 0-3).",
        rich_help_panel=_PIN,
    ),
    micro_batch: Optional[int] = typer.Option(None, "--micro-batch", min=1, rich_help_panel=_PIN),
    recompute: Optional[str] = typer.Option(
        None, "--recompute", help="none, selective or full.", rich_help_panel=_PIN
    ),
    sequence_parallel: Optional[bool] = typer.Option(
        None, "--sequence-parallel/--no-sequence-parallel", rich_help_panel=_PIN
    ),
    virtual_stages: Optional[int] = typer.Option(
        None, "--virtual-stages", min=1, rich_help_panel=_PIN
    ),
    estimate_only: bool = typer.Option(
        False,
        "--estimate",
        help="Evaluate exactly the pinned layout (pin every field); exit 2 if it does not fit.",
    ),
    measure_run: bool = typer.Option(
        False,
        "--measure",
        help="Run the top candidates of --config for a few steps each through the Ray workers and pick the fastest measured (settles close calls).",
    ),
    measure_top: int = typer.Option(3, "--measure-top", min=1, help="Candidates --measure runs."),
    measure_steps: int = typer.Option(
        5, "--measure-steps", min=2, help="Steps per measured candidate (the first is not timed)."
    ),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON document to stdout."),
    top: int = typer.Option(10, "--top", min=1, help="Rows shown (and listed in --json)."),
) -> None:
    """Choose a data x tensor x pipeline layout: memory per GPU and predicted throughput."""
    from orchestrator.planner import Pins, PlanRequest, get_gpu
    from orchestrator.planner import plan as run_plan
    from orchestrator.planner.step_time import DEFAULT_EFFICIENCY
    from orchestrator.planner.types import PIN_FIELDS

    check_plan_numbers(
        gpus=gpus,
        gpus_per_node=gpus_per_node,
        peak_tflops=peak_tflops,
        memory_gib=memory_gib,
        intra_node_gbs=intra_node_gbs,
        inter_node_gbs=inter_node_gbs,
        global_batch=global_batch,
        efficiency=efficiency,
    )
    if precision not in ("bf16", "fp16", "fp32"):
        raise PlanError(f"--precision {precision!r} must be bf16, fp16 or fp32")
    if attention is not None and attention not in ("dense", "mla"):
        raise PlanError(f"--attention {attention!r} must be dense or mla")
    if recompute is not None and recompute not in RECOMPUTE_CHOICES:
        raise PlanError(f"--recompute {recompute!r} must be one of {', '.join(RECOMPUTE_CHOICES)}")
    dims = dict(
        layers=layers,
        hidden=hidden,
        heads=heads,
        kv_heads=kv_heads,
        ffn_hidden=ffn_hidden,
        vocab=vocab,
        seq_len=seq_len,
        attention=attention,
        window=window,
        top_k=top_k,
    )
    cfg, job_seq = build_model(model, params, config, dims)
    batch, pins = (
        global_batch,
        Pins(
            dp=dp,
            tp=tp,
            pp=pp,
            zero_stage=zero,
            micro_batch=micro_batch,
            recompute=recompute,
            sequence_parallel=sequence_parallel,
            virtual_stages=virtual_stages,
        ),
    )
    if config:
        from orchestrator.config import load_job_config

        batch = batch or load_job_config(config).train.global_batch
    if estimate_only and not pins.complete():
        missing = [f for f in PIN_FIELDS if getattr(pins, f) is None]
        raise PlanError(
            f"--estimate needs every layout field pinned; missing: {', '.join(missing)}"
        )
    if gpus is None:
        if not pins.complete() or dp is None or tp is None or pp is None:
            raise PlanError("--gpus N is required (or pin --dp --tp --pp with --estimate)")
        gpus = dp * tp * pp
    allowed_zero = parse_zero_stages(zero_stages)
    check_node_size(gpus, gpus_per_node, zero, allowed_zero)
    spec = get_gpu(
        gpu,
        memory_gib=memory_gib,
        intra_node_gbs=intra_node_gbs,
        inter_node_gbs=inter_node_gbs,
        peak_tflops={precision: peak_tflops} if peak_tflops is not None else None,
    )
    request = PlanRequest(
        model=cfg,
        gpus=gpus,
        gpu=spec,
        global_batch=8 * gpus if batch is None else batch,
        seq_len=seq_len or job_seq or cfg.max_seq_len,
        gpus_per_node=gpus_per_node,
        precision=precision,
        pins=pins,
        allowed_zero_stages=allowed_zero,
        efficiency=DEFAULT_EFFICIENCY if efficiency is None else efficiency,
    )
    if measure_run and not config:
        raise PlanError("--measure needs --config JOB.yaml (the job whose candidates are run)")
    result = run_plan(request)
    measured = None
    if measure_run:
        from orchestrator.config import load_job_config
        from orchestrator.planner.measure import measure

        measured = measure(load_job_config(config), result.candidates, measure_top, measure_steps)
    if json_out:
        doc = result.to_json(limit=top)
        if measured is not None:
            doc["measured"] = [m.to_dict() for m in measured]
        print(json.dumps(doc, indent=2))
    else:
        print_result(result, top)
        if measured is not None:
            print_measured(measured)
    if result.estimate is not None and not result.estimate.estimate.fits:
        raise PlanError(f"the pinned layout does not fit: {result.estimate.estimate.reason}")


def print_measured(measured: list) -> None:
    """Measured vs predicted table of ``mla plan --measure``; the first row is the pick."""
    from rich.table import Table

    table = Table(title="measured (fastest first)")
    for col in (
        "layout",
        "predicted s",
        "80% range s",
        "measured s",
        "measured/predicted",
        "error",
    ):
        table.add_column(col)
    for m in measured:
        table.add_row(
            m.layout.describe(),
            f"{m.predicted_step_s:.3g}",
            "{:.3g}-{:.3g}".format(*m.interval_s),
            "-" if m.measured_step_s is None else f"{m.measured_step_s:.3g}",
            "-" if m.ratio is None else f"{m.ratio:.2f}",
            m.error,
        )
    console = out
    console.print(table)
    if measured[0].measured_step_s is not None:
        console.print(f"fastest measured: {measured[0].layout.describe()}", highlight=False)
