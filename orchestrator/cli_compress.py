"""``mla compress``: fit a trained model to a size and/or latency budget (torch imported inside).

Bad settings are refused before any work with exit status 2: ``--target-mb`` 0 or negative or
below the model's embedding, ``--target-latency-ms`` 0 or negative or below what the empty model
(embedding + tied head, no block) takes on this machine (measured in a second or two),
``--ffn-keep 0`` / ``--groups-keep 0`` / ``--hidden-keep 0`` / ``--layers-keep 0`` (pruning every
MLP neuron, head, hidden channel or block) or a shape above the model's, a negative loss
budget, ``--qat-steps`` with fp32, ``--early-exit`` layers that are not integers, out of range,
repeated or the last layer (:mod:`workers.compress_exit`). A budget that the pipeline cannot
meet writes the output
folder and report anyway and exits 2 with what it achieved (:mod:`workers.compress` describes
the stages).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from orchestrator.cli_common import err
from orchestrator.contract.errors import ConfigError

app = typer.Typer()


@app.command()
def compress(
    source: str = typer.Argument(
        ..., help="Run folder, checkpoint folder or export folder of the trained model."
    ),
    out: Path = typer.Option(..., "--out", help="Output folder (written atomically)."),
    target_mb: Optional[float] = typer.Option(
        None, "--target-mb", help="Size budget of the deployed file, in MB (10^6 bytes)."
    ),
    target_latency_ms: Optional[float] = typer.Option(
        None,
        "--target-latency-ms",
        help="Latency budget of the deployed file per forward pass of --batch windows, in ms, "
        "measured on this machine.",
    ),
    batch: int = typer.Option(1, "--batch", help="Windows per forward pass for the latency."),
    max_loss_increase: Optional[float] = typer.Option(
        None,
        "--max-loss-increase",
        help="Largest accepted validation-loss increase over the original, nats/token.",
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out."),
    precision: str = typer.Option("int8", "--precision", help="int8 (ONNX Runtime) or fp32."),
    steps: int = typer.Option(100, "--steps", help="Distillation steps per distilled shape."),
    qat_steps: int = typer.Option(
        0, "--qat-steps", help="INT8 quantisation-aware distillation steps after recovery."
    ),
    early_exit: Optional[str] = typer.Option(
        None,
        "--early-exit",
        help="Exit layers, e.g. 2,3: train shared-head exits, calibrate their threshold and "
        "save it in pruned/early_exit.json (torch path; the ONNX file stays full depth).",
    ),
    exit_steps: int = typer.Option(
        100, "--exit-steps", help="Exit-loss distillation steps (all weights train jointly)."
    ),
    exit_tolerance: Optional[float] = typer.Option(
        None,
        "--exit-tolerance",
        help="Loss the exit threshold may cost, nats/token (default: what --max-loss-increase "
        "leaves, else 0.02).",
    ),
    ffn_keep: Optional[int] = typer.Option(
        None, "--ffn-keep", help="Force this MLP width per layer instead of searching."
    ),
    groups_keep: Optional[int] = typer.Option(
        None, "--groups-keep", help="Force this many GQA head groups per layer."
    ),
    hidden_keep: Optional[int] = typer.Option(
        None, "--hidden-keep", help="Force this many hidden channels (d_model) in every layer."
    ),
    layers_keep: Optional[int] = typer.Option(
        None, "--layers-keep", help="Force this many transformer blocks (highest influence)."
    ),
    search_hidden_layers: bool = typer.Option(
        False,
        "--search-hidden-layers",
        help="Also search shapes with 3/4 of the hidden channels and with one block fewer.",
    ),
    candidates: int = typer.Option(2, "--candidates", help="Shapes within budget to distil."),
    distill_batch: int = typer.Option(
        8, "--distill-batch", help="Distillation micro-batch, in windows."
    ),
    lr: float = typer.Option(1e-3, "--lr", help="Distillation peak learning rate."),
    val_windows: int = typer.Option(64, "--val-windows", help="Validation windows scored."),
    threads: int = typer.Option(1, "--threads", help="CPU threads (torch and ONNX Runtime)."),
    tp: int = typer.Option(
        1, "--tp", help="Tensor-parallel degree the pruned model must still support."
    ),
    json_out: bool = typer.Option(False, "--json", help="Print compress_report.json to stdout."),
    recovery: str = typer.Option(
        "in-process",
        "--recovery",
        help="Distillation: 'in-process' or 'ray' (the Ray Train + DeepSpeed trainer of mla train).",
    ),
    workers: int = typer.Option(1, "--workers", help="Ray Train workers of --recovery ray."),
    address: Optional[str] = typer.Option(
        None, "--address", help="Ray address of --recovery ray (unset: embedded local Ray)."
    ),
) -> None:
    """Prune, distil and quantise a trained model to fit --target-mb and/or --target-latency-ms;
    verify the deployed file."""
    from workers.compress import CompressSettings, check_settings
    from workers.compress_exit import parse_exits

    settings = CompressSettings(
        target_mb=target_mb,
        target_latency_ms=target_latency_ms,
        latency_batch=batch,
        max_loss_increase=max_loss_increase,
        precision=precision,
        steps=steps,
        qat_steps=qat_steps,
        early_exit=parse_exits(early_exit) if early_exit is not None else (),
        exit_steps=exit_steps,
        exit_tolerance=exit_tolerance,
        ffn_keep=ffn_keep,
        groups_keep=groups_keep,
        hidden_keep=hidden_keep,
        layers_keep=layers_keep,
        search_hidden_layers=search_hidden_layers,
        candidates=candidates,
        distill_batch=distill_batch,
        lr=lr,
        val_windows=val_windows,
        threads=threads,
        tp=tp,
    )
    check_settings(settings)
    if recovery not in ("in-process", "ray") or workers < 1:
        raise ConfigError(
            f"--recovery={recovery!r} --workers={workers}: --recovery is 'in-process' or 'ray' "
            "(the Ray Train + DeepSpeed trainer of mla train), with --workers >= 1"
        )
    _check_out_is_not_the_source(out, source, overwrite)
    from mla.staged_dir import OutDirError, check_out_dir

    try:
        check_out_dir(out, overwrite)
    except OutDirError as exc:
        raise ConfigError(str(exc)) from None
    from orchestrator.cli_infer import _load
    from workers.compress import check_against_model, seq_len_of
    from workers.compress import compress as run_compress

    loaded = _load(source, "cpu")
    if loaded.tokenizer.kind != "byte":
        raise ConfigError(
            f"{source}: the run trained with a {loaded.tokenizer.kind} tokenizer; mla compress "
            "and its ONNX runner support byte-tokenized models only so far; compress a run "
            "trained with data.tokenizer: byte"
        )
    measured = check_against_model(settings, loaded.cfg, seq_len_of(loaded.job, loaded.cfg))
    if recovery == "ray":  # the trainer's job needs the teacher's folder and its run's data
        import dataclasses

        from orchestrator.compress_recovery import RayRecovery

        data = (loaded.job or {}).get("data")
        ray = RayRecovery(str(Path(source).resolve()), data, workers, address)
        settings = dataclasses.replace(settings, recover=ray)
    try:
        report = run_compress(loaded.model, loaded.job, settings, out, source, err, measured)
    except OutDirError as exc:
        raise ConfigError(str(exc)) from None
    _print_table(report, batch)
    if json_out:
        print(json.dumps(report, indent=2))
    if "failure" in report:
        err.print(f"budget not met: {report['failure']} (report: {out / 'compress_report.json'})")
        raise typer.Exit(2)
    err.print(f"wrote {out} (compress_report.json, {report['deployed']['file']}, pruned/)")


def _check_out_is_not_the_source(out: Path, source: str, overwrite: bool) -> None:
    """Refuse an ``--out`` whose replacement would delete the model being compressed.

    Raises:
        ConfigError: ``out`` is the source folder or holds it, or (with ``--overwrite``) an
            existing folder inside it.
    """
    src, dst = Path(source).expanduser().resolve(), out.expanduser().resolve()
    inside = src in dst.parents
    if dst == src or dst in src.parents or (inside and overwrite and dst.exists()):
        raise ConfigError(
            f"--out {out} is the source {source}, holds it or is part of it: writing there "
            "would delete the trained model; choose an --out outside the source folder"
        )


def _print_table(report: dict, batch: int) -> None:
    from rich.table import Table

    table = Table(title="mla compress")
    batches = sorted({1, 8, batch})
    cols = ["model", "params", "size MB", *(f"b{b} ms" for b in batches), "val loss", "Δ loss"]
    for col in cols:
        table.add_column(col, justify="right" if col != "model" else "left")
    base = report["teacher"]["val_loss"]
    rows = [("original, torch fp32", report["teacher"])]
    rows += [
        (f"original, ONNX {k.split('_')[-1]}", v)
        for k, v in report.items()
        if k.startswith("teacher_onnx")
    ]
    if "deployed" in report:
        d = report["deployed"]
        qat = f" (+{report['qat']['steps']} QAT steps)" if "qat" in report else ""
        shape = f"ffn {d['ffn_keep']} groups {d['groups_keep']}"
        if d.get("hidden_keep") is not None:
            shape += f" hidden {d['hidden_keep']} layers {d['layers_keep']}"
        rows.append((f"{shape}{qat}, {d['file']}", d))
    for name, r in rows:
        table.add_row(
            name,
            f"{r.get('params', '')}" if "params" in r else "",
            f"{r['size_mb']:.3f}",
            *(f"{r['latency_ms'][str(b)]:.2f}" for b in batches),
            f"{r['val_loss']:.4f}",
            f"{r['val_loss'] - base:+.4f}",
        )
    err.print(table)
    if "early_exit" in report:
        _print_exits(report["early_exit"])


def _print_exits(e: dict) -> None:
    from rich.table import Table

    table = Table(title="early exit (torch path, pruned/early_exit.json)")
    for col in ("exits", "threshold", "tokens per exit", "mean layers", "compute saved"):
        table.add_column(col, justify="right")
    for col in ("val loss exits / full", "decode b1 tok/s exits / full"):
        table.add_column(col, justify="right")
    d = e["decode_batch1"]
    table.add_row(
        ",".join(map(str, e["exits"])),
        f"{e['threshold']:g}",
        " ".join(f"{k}:{v:.0%}" for k, v in e["exit_fractions"].items()),
        f"{e['mean_layers']:.2f}",
        f"{e['compute_saved']:.1%}",
        f"{e['val_loss_with_exits']:.4f} / {e['val_loss_without_exits']:.4f}",
        f"{d['tokens_per_s_exit']:.0f} / {d['tokens_per_s_full']:.0f} ({d['speedup']:.2f}x)",
    )
    err.print(table)
