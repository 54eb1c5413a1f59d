"""``mla compress``: fit a trained model to a size budget (torch imported inside).

Bad settings (``--target-mb 0``, a target below the model's embedding, negative loss budget)
are refused before any work with exit status 2. A budget that the pipeline cannot meet writes
the output folder and report anyway and exits 2 with what it achieved
(:mod:`workers.compress` describes the stages).
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
    target_mb: float = typer.Option(
        ..., "--target-mb", help="Size budget of the deployed file, in MB (10^6 bytes)."
    ),
    max_loss_increase: Optional[float] = typer.Option(
        None,
        "--max-loss-increase",
        help="Largest accepted validation-loss increase over the original, nats/token.",
    ),
    out: Path = typer.Option(..., "--out", help="Output folder (written atomically)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out."),
    precision: str = typer.Option("int8", "--precision", help="int8 (ONNX Runtime) or fp32."),
    steps: int = typer.Option(100, "--steps", help="Distillation steps per distilled shape."),
    candidates: int = typer.Option(2, "--candidates", help="Shapes within budget to distil."),
    batch: int = typer.Option(8, "--batch", help="Distillation micro-batch, in windows."),
    lr: float = typer.Option(1e-3, "--lr", help="Distillation peak learning rate."),
    val_windows: int = typer.Option(64, "--val-windows", help="Validation windows scored."),
    threads: int = typer.Option(1, "--threads", help="CPU threads (torch and ONNX Runtime)."),
    tp: int = typer.Option(
        1, "--tp", help="Tensor-parallel degree the pruned model must still support."
    ),
    json_out: bool = typer.Option(False, "--json", help="Print compress_report.json to stdout."),
) -> None:
    """Prune, distil and quantise a trained model to fit --target-mb; verify the deployed file."""
    from workers.compress import CompressSettings, check_settings

    settings = CompressSettings(
        target_mb=target_mb,
        max_loss_increase=max_loss_increase,
        precision=precision,
        steps=steps,
        candidates=candidates,
        batch=batch,
        lr=lr,
        val_windows=val_windows,
        threads=threads,
        tp=tp,
    )
    check_settings(settings)
    from mla.staged_dir import OutDirError, check_out_dir

    try:
        check_out_dir(out, overwrite)
    except OutDirError as exc:
        raise ConfigError(str(exc)) from None
    from orchestrator.cli_infer import _load
    from workers.compress import MB, floor_bytes
    from workers.compress import compress as run_compress

    loaded = _load(source, "cpu")
    floor = floor_bytes(loaded.cfg, precision)
    if target_mb * MB < floor:
        raise ConfigError(
            f"--target-mb={target_mb:g} is below what this model takes with every prunable unit "
            f"removed ({floor / MB:.3f} MB: token embedding and norms, {precision}); raise "
            "--target-mb" + (" or use --precision int8" if precision == "fp32" else "")
        )
    report = run_compress(loaded.model, loaded.job, settings, out, source, err)
    _print_table(report)
    if json_out:
        print(json.dumps(report, indent=2))
    if "failure" in report:
        err.print(f"budget not met: {report['failure']} (report: {out / 'compress_report.json'})")
        raise typer.Exit(2)
    err.print(f"wrote {out} (compress_report.json, {report['deployed']['file']}, pruned/)")


def _print_table(report: dict) -> None:
    from rich.table import Table

    table = Table(title="mla compress")
    for col in ("model", "params", "size MB", "b1 ms", "b8 ms", "val loss", "Δ loss"):
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
        rows.append((f"ffn {d['ffn_keep']} groups {d['groups_keep']}, {d['file']}", d))
    for name, r in rows:
        table.add_row(
            name,
            f"{r.get('params', '')}" if "params" in r else "",
            f"{r['size_mb']:.3f}",
            f"{r['latency_ms']['1']:.2f}",
            f"{r['latency_ms']['8']:.2f}",
            f"{r['val_loss']:.4f}",
            f"{r['val_loss'] - base:+.4f}",
        )
    err.print(table)
