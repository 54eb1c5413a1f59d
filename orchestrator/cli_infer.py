"""``mla generate``, ``mla eval``, ``mla export``: use a trained model (torch imported inside).

Each command takes a run folder (its newest complete checkpoint), a checkpoint folder or an
export folder, loaded by :func:`workers.inference.load_model`. Generated text streams to stdout;
progress and notes go to stderr; ``--json`` prints one machine-readable document to stdout. Bad
input (missing or unfinished checkpoint, empty or too long prompt, out-of-range sampling
options, a sequence length the model cannot take) raises an :class:`~orchestrator.contract.errors.MLAError`
subclass: one message, exit status 2.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from orchestrator.cli_common import err
from orchestrator.contract.errors import CheckpointError, ConfigError
from orchestrator.contract.jsonl import jsonl_strings

app = typer.Typer()

SourceArg = typer.Argument(
    ...,
    help="Run folder (runs/NAME), checkpoint folder (runs/NAME/checkpoints/"
    "step_NNNNNNN) or export folder (mla export).",
)
DeviceOption = typer.Option("cpu", "--device", help="cpu or cuda.")
EarlyExitOption = typer.Option(
    None,
    "--early-exit/--no-early-exit",
    help="Route tokens through the exits of SOURCE/early_exit.json (`mla compress "
    "--early-exit`); default: on when that file is there. Torch path only.",
)


@app.command()
def generate(
    source: str = SourceArg,
    prompt: Optional[list[str]] = typer.Option(
        None, "--prompt", help="Prompt text (repeat for a batch of prompts)."
    ),
    prompt_file: Optional[Path] = typer.Option(
        None,
        "--prompt-file",
        help="File whose whole text is one prompt; "
        'a .jsonl file gives one prompt per line ({"prompt": ...}).',
    ),
    max_new_tokens: int = typer.Option(200, "--max-new-tokens", help="New tokens per prompt."),
    temperature: float = typer.Option(
        0.8, "--temperature", help="Sampling temperature (>= 0; 0 is greedy)."
    ),
    top_k: Optional[int] = typer.Option(
        None, "--top-k", help="Sample among the k most likely tokens (>= 1)."
    ),
    top_p: float = typer.Option(
        1.0,
        "--top-p",
        help="Nucleus sampling: smallest set of tokens with probability sum >= p, in (0, 1].",
    ),
    seed: int = typer.Option(0, "--seed", help="Sampling seed (same seed, same output)."),
    device: str = DeviceOption,
    json_out: bool = typer.Option(
        False, "--json", help="Print prompts and completions as JSON instead of streaming."
    ),
    onnx: bool = typer.Option(
        False,
        "--onnx",
        help="SOURCE is an ONNX model (a .onnx file or an `mla compress` --out folder), run by "
        "ONNX Runtime: full window per token, no KV cache (for checking a deployed file).",
    ),
    early_exit: Optional[bool] = EarlyExitOption,
) -> None:
    """Generate text from a trained model with the KV cache, streaming tokens as they come."""
    sampling = _sampling(temperature, top_k, top_p, seed)
    prompts = _read_prompts(prompt, prompt_file)
    loaded = _load_onnx(source, 1) if onnx else _load(source, device)
    exits = _exit_config(loaded, early_exit, onnx)
    from mla.generate import check_prompts

    tokenizer = getattr(loaded, "tokenizer", None) or _byte()

    limit = loaded.model.seq_len if onnx else loaded.cfg.max_seq_len
    ids = [tokenizer.encode(p) for p in prompts]
    try:
        check_prompts(ids, max_new_tokens, limit)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    _note_capped(ids, max_new_tokens, limit)
    stream = _Streamer(prompts, tokenizer) if not json_out else None
    on_tokens = stream.on_tokens if stream else None
    layers = None
    if onnx:
        from mla.compress.onnx_generate import generate_onnx

        out = generate_onnx(loaded.model, limit, ids, max_new_tokens, sampling, on_tokens)
    elif exits:
        from mla.compress.early_exit import generate_early_exit

        out, stats = generate_early_exit(
            loaded.model, ids, max_new_tokens, sampling, exits["exits"], exits["threshold"],
            on_tokens,
        )  # fmt: skip
        layers = stats.layers.view(-1, len(ids)).float().mean(0).tolist() if out[0] else None
    else:
        from mla.generate import generate as run_generate

        out = run_generate(loaded.model, ids, max_new_tokens, sampling, on_tokens=on_tokens)
    if stream:
        stream.close()
    else:
        rows = [
            {"prompt": p, "completion": tokenizer.decode(o), "new_tokens": len(o)}
            for p, o in zip(prompts, out, strict=False)
        ]
        for row, mean in zip(rows, layers or [], strict=False):
            row["early_exit"] = {**_exit_brief(exits), "mean_layers": mean}
        print(json.dumps(rows, indent=2))
    if exits and layers is not None:
        err.print(
            f"early exit: mean {sum(layers) / len(layers):.2f} of {loaded.cfg.n_layers} layers "
            "per new token",
            markup=False,
            highlight=False,
        )


class _Streamer:
    """Write generated text to stdout as it comes: one prompt streams live; a batch is printed
    prompt by prompt at the end (interleaving rows on one terminal is unreadable)."""

    def __init__(self, prompts: list[str], tokenizer=None) -> None:
        from mla.tokenizer import StreamDecoder

        self.prompts = prompts
        self.decoders = [StreamDecoder(tokenizer) for _ in prompts]
        self.text = ["" for _ in prompts]
        if len(prompts) == 1:
            sys.stdout.write(prompts[0])
            sys.stdout.flush()

    def on_tokens(self, step: int, tokens: list[int | None]) -> None:
        for i, tok in enumerate(tokens):
            if tok is not None:
                self.text[i] += self.decoders[i].feed([tok])
        if len(self.prompts) == 1:
            sys.stdout.write(self.text[0])
            sys.stdout.flush()
            self.text[0] = ""

    def close(self) -> None:
        if len(self.prompts) == 1:
            sys.stdout.write(self.text[0] + self.decoders[0].flush() + "\n")
            return
        for i, p in enumerate(self.prompts):
            sys.stdout.write(f"=== prompt {i + 1}\n{p}{self.text[i]}{self.decoders[i].flush()}\n")
        sys.stdout.flush()


@app.command("eval")
def eval_command(
    source: str = SourceArg,
    data: Optional[str] = typer.Option(
        None,
        "--data",
        help="Score this data instead of the run's (text file, "
        "folder, .jsonl, .parquet; as data.path).",
    ),
    seq_len: Optional[int] = typer.Option(
        None, "--seq-len", help="Tokens per window (default: the run's data.seq_len)."
    ),
    split: str = typer.Option("val", "--split", help="val, train or all."),
    max_windows: Optional[int] = typer.Option(
        None, "--max-windows", help="Score at most this many windows."
    ),
    batch_size: int = typer.Option(8, "--batch-size", help="Windows per forward pass."),
    device: str = DeviceOption,
    onnx: bool = typer.Option(
        False,
        "--onnx",
        help="SOURCE is an ONNX model (a .onnx file or an `mla compress` --out folder), "
        "run by ONNX Runtime on the CPU.",
    ),
    threads: int = typer.Option(1, "--threads", help="ONNX Runtime threads (with --onnx)."),
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON to stdout."),
    early_exit: Optional[bool] = EarlyExitOption,
) -> None:
    """Loss, perplexity and bits per byte of a trained model on held-out text."""
    if batch_size < 1:
        raise ConfigError(f"--batch-size={batch_size} must be >= 1")
    if threads < 1:
        raise ConfigError(f"--threads={threads} must be >= 1")
    if seq_len is not None and seq_len < 2:
        raise ConfigError(
            f"--seq-len={seq_len}: a window needs at least 2 tokens (inputs and next-token "
            "targets); give --seq-len 2 or more, or drop it for the run's data.seq_len"
        )
    loaded = _load_onnx(source, threads) if onnx else _load(source, device)
    exits = _exit_config(loaded, early_exit, onnx)
    from workers.evaluation import check_seq_len, eval_windows, evaluate

    console = err
    trained = ((loaded.job or {}).get("data") or {}).get("seq_len")
    if onnx:
        seq_len = _onnx_seq_len(seq_len, loaded.model.seq_len)
        trained = trained if trained == seq_len else None
    note = check_seq_len(
        seq_len or trained or loaded.cfg.max_seq_len, loaded.cfg.max_seq_len, trained
    )
    if note:
        console.print(note, markup=False)
    windows = eval_windows(
        loaded.job,
        data,
        seq_len or (None if trained else loaded.cfg.max_seq_len),
        split,
        max_windows,
        getattr(loaded, "tokenizer", None),
    )
    console.print(f"scoring {windows.description}", markup=False, highlight=False)
    result = evaluate(loaded.model, windows, batch_size)
    result = {
        "source": str(loaded.source),
        "checkpoint": str(getattr(loaded, "checkpoint", None) or "") or None,
        "step": getattr(loaded, "step", None),
        "runtime": "onnxruntime" if onnx else "torch",
        "data": windows.description,
        **result,
    }
    if exits:
        from workers.compress_exit import routed_eval

        routed = routed_eval(loaded.model, windows, exits["exits"], exits["threshold"], batch_size)
        result["early_exit"] = {**_exit_brief(exits), **routed}
    if json_out:
        print(json.dumps(result, indent=2))
    else:
        print(
            f"loss {result['loss']:.6f} nats/token  perplexity {result['perplexity']:.4f}  "
            f"bits/byte {result['bits_per_byte']:.4f}  ({result['tokens']:,} tokens, {result['windows']} windows)"
        )
        if exits:
            e = result["early_exit"]
            where = "  ".join(f"layer {k}: {v:.1%}" for k, v in e["exit_fractions"].items())
            print(
                f"early exit (layers {e['exits']}, threshold {e['threshold']:g}): loss "
                f"{e['val_loss']:.6f} with exits, {e['val_loss_full']:.6f} without; mean "
                f"{e['mean_layers']:.2f} layers, {e['compute_saved']:.1%} of block compute saved; "
                f"tokens per exit: {where}"
            )


@app.command()
def export(
    source: str = SourceArg,
    out: Path = typer.Option(..., "--out", help="Folder to create (written atomically)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out folder."),
) -> None:
    """Export a checkpoint as safetensors + config.json + tokenizer info + README (mla.load_pretrained)."""
    from mla.pretrained import save_pretrained
    from mla.staged_dir import OutDirError, check_out_dir

    try:
        check_out_dir(out, overwrite)  # before loading anything
        loaded = _load(source, "cpu")
        src = {"checkpoint": str(loaded.checkpoint or loaded.source), "step": loaded.step}
        path = save_pretrained(
            loaded.model, out, source=src, overwrite=overwrite, tokenizer=loaded.tokenizer
        )
    except OutDirError as exc:
        raise ConfigError(str(exc)) from None
    what = f"step {loaded.step}" if loaded.step is not None else f"the model of {loaded.source}"
    print(f"exported {what} to {path} (model.safetensors, config.json, tokenizer.json, README.md)")


# ---------------------------------------------------------------------------- helpers


def _sampling(temperature: float, top_k: Optional[int], top_p: float, seed: int):
    import math

    from mla.sampling import SamplingConfig

    if not (math.isfinite(temperature) and temperature >= 0):
        raise ConfigError(
            f"--temperature={temperature} must be a finite number >= 0 "
            "(0 means greedy decoding), e.g. --temperature 0.8"
        )
    try:
        return SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _note_capped(ids: list[list[int]], max_new_tokens: int, limit: int) -> None:
    """One stderr line when a prompt would run past ``max_seq_len``: generation stops there
    (the rotary table and the KV cache end at it), as Hugging Face's ``max_length`` warns. The
    last new token is sampled from position ``max_seq_len``'s logits, so a row gets at most
    ``max_seq_len - len(prompt) + 1`` (:func:`mla.generate.generate`)."""
    room = min(limit - len(p) + 1 for p in ids)
    if max_new_tokens > room:
        err.print(
            f"note: --max-new-tokens {max_new_tokens} capped at {room}: generation stops at the "
            f"model's max_seq_len ({limit} tokens, prompt included)",
            markup=False,
            highlight=False,
        )


def _read_prompts(prompt: Optional[list[str]], prompt_file: Optional[Path]) -> list[str]:
    prompts = list(prompt or [])
    if prompt_file is not None:
        if not prompt_file.is_file():
            raise ConfigError(f"--prompt-file {prompt_file} does not exist or is not a file")
        try:
            text = prompt_file.read_bytes().decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ConfigError(
                f"--prompt-file {prompt_file} is not UTF-8 text (byte {exc.start} is not valid "
                'UTF-8); give a text file, or a .jsonl file with one {"prompt": ...} per line'
            ) from None
        if prompt_file.suffix.lower() == ".jsonl":
            prompts += _jsonl_prompts(prompt_file, text)
        else:
            prompts.append(text)
    if not prompts:
        raise ConfigError("no prompt given; pass --prompt TEXT (repeatable) or --prompt-file FILE")
    return prompts


def _jsonl_prompts(path: Path, text: str) -> list[str]:
    return [prompt for _, prompt in jsonl_strings(path, text.splitlines(), "prompt", ConfigError)]


def _onnx_seq_len(asked: Optional[int], exported: int) -> int:
    """The window length for an ONNX model: its exported length (the graph takes no other)."""
    if asked not in (None, exported):
        raise ConfigError(
            f"--seq-len={asked} but the ONNX model takes windows of exactly {exported} tokens; "
            f"use --seq-len {exported} or drop --onnx"
        )
    return exported


def _load_onnx(source: str, threads: int):
    """Load an ONNX model (see :func:`workers.inference.load_onnx`)."""
    from workers.inference import load_onnx

    loaded = load_onnx(source, threads)
    if loaded.cfg.vocab_size != 256:
        raise CheckpointError(
            f"{source}: vocab_size {loaded.cfg.vocab_size} is not the byte tokenizer's 256"
        )
    return loaded


def _exit_config(loaded, flag: Optional[bool], onnx: bool) -> dict | None:
    """The exits to use: ``SOURCE/early_exit.json`` when present (``--early-exit`` requires
    it, ``--no-early-exit`` ignores it); never with ``--onnx`` (the file is full depth)."""
    if flag is False:
        return None
    if onnx:
        if flag:
            raise ConfigError(
                "--early-exit runs on the torch path only (the ONNX file is the full-depth "
                "graph); drop --onnx and pass the `mla compress` OUT/pruned folder"
            )
        return None
    from workers.compress_exit import EXIT_FILE, load_exit_config

    folder = Path(loaded.source)
    config = load_exit_config(folder, loaded.cfg.n_layers) if folder.is_dir() else None
    if flag and config is None:
        raise ConfigError(
            f"--early-exit: {folder} holds no {EXIT_FILE}; compress with `mla compress "
            "--early-exit LAYERS` and pass its OUT/pruned folder, or drop --early-exit"
        )
    if config is not None and next(loaded.model.parameters()).device.type != "cpu":
        if flag:
            raise ConfigError("--early-exit runs on the CPU here; use --device cpu")
        err.print("note: early exit skipped on --device cuda (CPU only)", markup=False)
        return None
    if config is not None:
        err.print(
            f"early exit: layers {config['exits']}, threshold {config['threshold']:g} "
            f"({folder / EXIT_FILE}); --no-early-exit for the full model",
            markup=False,
            highlight=False,
        )
    return config


def _exit_brief(config: dict | None) -> dict:
    return {"exits": (config or {}).get("exits"), "threshold": (config or {}).get("threshold")}


def _byte():
    from mla.tokenizer import ByteTokenizer

    return ByteTokenizer()


def _load(source: str, device: str):
    """Load the model (see :func:`workers.inference.load_model`); checks ``--device``."""
    if device not in ("cpu", "cuda"):
        raise ConfigError(f"--device={device!r} must be 'cpu' or 'cuda'")
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device=cuda but torch sees no CUDA device; use --device cpu")
    from workers.inference import load_model

    loaded = load_model(source, device=device, dtype=torch.bfloat16 if device == "cuda" else None)
    for skipped in loaded.skipped:
        err.print(f"warning: skipped the newer checkpoint {skipped}; using {loaded.checkpoint}")
    if loaded.cfg.vocab_size < loaded.tokenizer.vocab_size:
        raise CheckpointError(
            f"{source}: vocab_size {loaded.cfg.vocab_size} is smaller than its tokenizer's "
            f"{loaded.tokenizer.vocab_size} ids"
        )
    return loaded
