"""A run folder in the exact format `mla train` writes (for the inference tests, without Ray):
``job.json``, ``checkpoints/step_NNNNNNN/{meta.json,manifest.json}`` and ``consolidated/{stage_000.pt,
state.json}`` as :mod:`workers.checkpoint` and :mod:`workers.parallel.reshard` lay them out."""

import json
from pathlib import Path

import torch

from mla.config import ModelConfig
from mla.model import MLATransformer
from orchestrator.contract.checkpoints import MANIFEST, build_manifest
from workers.parallel.reshard import FORMAT, OPTIM_KEYS

TINY = dict(
    vocab_size=256,
    d_model=32,
    n_layers=2,
    n_heads=4,
    ffn_hidden=64,
    max_seq_len=64,
    attention="mla",
    local_window=8,
    global_k=8,
    block_size=8,
)


def write_run(
    root: Path, step: int = 10, seed: int = 0, data_path: str | None = None, **model_kw
) -> tuple[Path, MLATransformer]:
    """Write a run folder holding one complete checkpoint of a random model; return (run, model)."""
    cfg = ModelConfig(**{**TINY, **model_kw})
    torch.manual_seed(seed)
    model = MLATransformer(cfg).eval()
    run = root / "run"
    ckpt = run / "checkpoints" / f"step_{step:07d}"
    folder = ckpt / "consolidated"
    folder.mkdir(parents=True)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    torch.save(
        {
            "param": params,
            **{k: {n: torch.zeros_like(t) for n, t in params.items()} for k in OPTIM_KEYS},
        },
        folder / "stage_000.pt",
    )
    layout = {"dp": 1, "tp": 1, "pp": 1, "zero_stage": 0, "micro_batch": 2, "grad_accum": 1}
    (folder / "state.json").write_text(
        json.dumps(
            {
                "format": FORMAT,
                "adam_step": step,
                "client_state": {"step": step},
                "scheduler": None,
                "layout": layout,
            }
        )
    )
    (ckpt / "meta.json").write_text(
        json.dumps(
            {
                "step": step,
                "tag": "consolidated",
                "world_size": 1,
                "layout": layout,
                "model": cfg.to_dict(),
            }
        )
    )
    (ckpt / MANIFEST).write_text(
        json.dumps(build_manifest(ckpt))
    )  # last, as workers.checkpoint does
    job = {
        "data": {"path": data_path, "val_fraction": 0.5, "seq_len": 32},
        "train": {"seed": 3, "global_batch": 2, "eval_batches": 2},
    }
    (run / "job.json").write_text(json.dumps(job))
    return run, model
