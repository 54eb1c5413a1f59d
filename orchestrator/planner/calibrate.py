"""Published layouts as planner requests, and fitting the achievable efficiency to them.

``published_layouts.csv`` (formulas.md's companion) lists real training runs: model shape, GPUs,
the layout used and, for some, the achieved TFLOP/s or MFU. :func:`load_published` turns each
row with enough data into a :class:`PublishedRow`; :func:`fit_efficiency` picks the fraction of
peak that makes the step-time model reproduce the achieved numbers (median absolute log error).

Row rules (documented assumptions): missing vocabulary = 51,200 (Megatron's padded GPT-2 BPE);
MLP width ``8h/3`` SwiGLU (the same ``12h²`` parameters per layer as GPT's 4h GELU MLP); key/value
heads = heads (the CSV has no GQA column); dropout 0.1 for GPT-style Megatron rows; no
FlashAttention and no overlap of the data-parallel all-reduce with backward before 2022 (SC21,
Korthikanti, MT-NLG, GPT-NeoX); GQA and FFN width of Llama/Falcon from their papers; fp16 where the notes say so,
else bf16. The run's framework is part of the request: ZeRO stages from the ZeRO column, else the
framework's (:func:`_zero_stages`), Megatron's fp32 main gradients, and the overlap flags the notes
state (``--overlap-param-gather``, ``--tp-comm-overlap``), and the counted memory
(:data:`.constants.MEGATRON_DGX`: these frameworks' memory is what the papers count). Achieved TFLOP/s counted with recomputation (SC21 eq. 3, MT-NLG) are compared with the
predicted *hardware* TFLOP/s, the others with model TFLOP/s or MFU.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

from mla.config import ModelConfig
from orchestrator.contract.errors import PlanError
from orchestrator.contract.layout import Recompute
from orchestrator.planner.constants import MEGATRON_DGX
from orchestrator.planner.evaluate import estimate
from orchestrator.planner.search import plan
from orchestrator.planner.types import Candidate, Pins, PlanRequest

DEFAULT_VOCAB = 51200


@dataclass(frozen=True)
class PublishedRow:
    """One usable CSV row: the constrained request, the published degrees and achieved numbers."""

    name: str
    request: PlanRequest
    published: Pins
    achieved: float | None
    metric: str  # "hardware_tflops", "model_tflops" or "mfu"


def _num(text: str) -> float | None:
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def _int(row: dict, key: str) -> int:
    """``row[key]`` as an int.

    Raises:
        PlanError: the cell is empty or not a number (:func:`row_problem` names such rows).
    """
    value = _num(row[key])
    if value is None:
        raise PlanError(
            f"published row {row['model']!r}: {key}={row[key]!r} is not a number; "
            f"skip rows for which row_problem() gives a reason"
        )
    return int(value)


def _gpu(row: dict) -> str | None:
    text, mem = row["gpu"].lower(), _num(row["gpu_mem_gb"])
    if "a100" in text:
        return "a100-40gb" if ("40gb" in text or mem == 40) else "a100-80gb"
    if "h100" in text:
        return "h100-96gb" if ("96gb" in text or mem == 96) else "h100"
    return None


#: Frameworks that offer no ZeRO stage above 1, recognised by a word of the row's source or notes.
#: Megatron-LM (SC21, Korthikanti et al., the Megatron-Core README) and NeMo: the distributed
#: optimizer shards only the optimizer state, ZeRO-1-like (Megatron-LM README "Distributed
#: Optimizer"); MT-NLG ran Megatron-DeepSpeed and GPT-NeoX DeepSpeed's pipeline engine, which
#: support ZeRO 0-1 with pipelines (Smith et al. 2022 §2.2, Black et al. 2022 §2.3); TII's
#: Gigatron uses "3D parallelism and ZeRO optimizer sharding" (Almazrouei et al. 2023,
#: arXiv:2311.16867 §4.3) for all three Falcon models (source "tiiuae").
MEGATRON_STYLE = (
    "SC21",
    "Korthikanti",
    "Megatron-LM",
    "NeMo",
    "MT-NLG",
    "gpt-neox",
    "Gigatron",
    "tiiuae",
)


#: Frameworks whose bf16 gradients live in an unsharded fp32 buffer (``PlanRequest.fp32_main_grads``):
#: Megatron-LM and NeMo (``main_grad``; Megatron-LM README "Distributed Optimizer" bf16 row) and
#: Megatron-DeepSpeed's BF16 optimizer (BigScience tr11 chronicles: "4bytes x params and it's not
#: sharded across gpus"). No effect on fp16 rows.
FP32_MAIN_GRADS = ("SC21", "Korthikanti", "Megatron-LM", "NeMo", "MT-NLG")


def _zero_stages(row: dict) -> tuple | None:
    """ZeRO stages the row's run could use: the stated stage, else its framework's (``None`` = any).

    ``ZeRO-3`` / ``FULL_SHARD`` → (3,); Llama 3's "FSDP (~ZeRO-2)" → (1, 2), since a layout with
    pipelines represents ZeRO-2-like sharding only as ZeRO-1 (``orchestrator.contract.layout.Layout``);
    "stage 1" in the text → (1,); a Megatron-style framework (:data:`MEGATRON_STYLE`) → (0, 1).
    """
    text = row["zero_stage"].strip()
    if text in ("0", "1", "2", "3"):
        return (int(text),)
    if "ZeRO-3" in text or "FULL_SHARD" in text:
        return (3,)
    if "ZeRO-2" in text:
        return (1, 2)
    if "stage 1" in text:
        return (1,)
    if any(k in row["source"] or k in row["notes"] for k in MEGATRON_STYLE):
        return (0, 1)
    return None


def _recompute(row: dict) -> Recompute | None:
    text = row["recompute"].lower()
    policies: tuple[Recompute, ...] = ("full", "selective", "none")
    for policy in policies:
        if text.startswith(policy):
            return policy
    if not text and "hardware flops (recompute)" in row["notes"].lower():
        return "full"
    return None


def _metric(row: dict) -> tuple[float | None, str]:
    tflops, mfu = _num(row["achieved_tflops_per_gpu"]), _num(row["mfu_percent"])
    if tflops and ("HFU-like" in row["notes"] or "hardware FLOPs" in row["notes"]):
        return tflops, "hardware_tflops"
    if tflops:
        return tflops, "model_tflops"
    return (mfu / 100, "mfu") if mfu else (None, "")


#: Architecture facts the CSV lacks, from the model papers: (key/value heads, SwiGLU width).
#: Llama 2 (Touvron et al. 2023, Table 1/§2.2: GQA with 8 KV heads for 70B), Llama 3 (Llama Team
#: 2024, Table 3: 8 KV heads, FFN 14,336 / 28,672 / 53,248), Falcon (TII model cards: multi-query
#: for 7B, 8 KV groups for 40B/180B).
KNOWN_ARCH = {
    "Llama 3 8B": (8, 14336),
    "Llama 3 70B": (8, 28672),
    "Llama 3.1 405B": (8, 53248),
    "Llama 2 13B": (40, 13824),
    "Llama 2 70B": (8, 28672),
    "Falcon-7B": (1, None),
    "Falcon-40B": (8, None),
    "Falcon-180B": (8, None),
}


def _model(row: dict) -> ModelConfig:
    h, heads, layers, seq = (_int(row, k) for k in ("hidden", "heads", "layers", "seq_len"))
    vocab = int(_num(row["vocab"]) or DEFAULT_VOCAB)
    gpt = any(k in row["model"] for k in ("GPT", "NLG", "Megatron"))
    kv, ffn = next((v for k, v in KNOWN_ARCH.items() if row["model"].startswith(k)), (None, None))
    return ModelConfig(
        vocab_size=vocab,
        d_model=h,
        n_layers=layers,
        n_heads=heads,
        n_kv_heads=kv,
        ffn_hidden=ffn or round(8 * h / 3),
        max_seq_len=seq,
        attention="dense",
        dropout=0.1 if gpt else 0.0,
    )


def row_problem(row: dict) -> str:
    """Why a CSV row cannot be used ('' if it can)."""
    needed = ("layers", "hidden", "heads", "seq_len", "num_gpus", "tp", "pp", "global_batch")
    missing = [k for k in needed if _num(row[k]) is None]
    if missing:
        return "missing " + ", ".join(missing)
    if _gpu(row) is None:
        return f"GPU {row['gpu']!r} not in the catalogue"
    extra = row["cp_or_ep"].strip()
    if extra and extra != "CP=1":
        return f"{extra} (context/expert parallelism not modelled)"
    return ""


def to_published(row: dict) -> PublishedRow:
    """Convert a usable row (see :func:`row_problem`).

    Raises:
        PlanError: the row is not usable (a needed number is missing, the GPU is not catalogued).
    """
    gpus, tp, pp = (_int(row, k) for k in ("num_gpus", "tp", "pp"))
    gpu = _gpu(row)
    if gpu is None:
        raise PlanError(f"published row {row['model']!r}: GPU {row['gpu']!r} not in the catalogue")
    old = any(k in row["source"] for k in ("SC21", "Korthikanti", "MT-NLG", "gpt-neox"))
    pins = Pins(recompute=_recompute(row))
    request = PlanRequest(
        model=_model(row),
        gpus=gpus,
        gpu=gpu,
        global_batch=_int(row, "global_batch"),
        precision="fp16" if "fp16" in row["notes"] else "bf16",
        pins=pins,
        flash_attention=not old,
        overlap_dp=not old,
        allowed_zero_stages=_zero_stages(row),
        fp32_main_grads=any(k in row["source"] for k in FP32_MAIN_GRADS),
        overlap_param_gather="--overlap-param-gather" in row["notes"],
        overlap_tp="--tp-comm-overlap" in row["notes"],
        constants=MEGATRON_DGX,
    )
    mb, v = _num(row["micro_batch"]), _num(row["interleave_v"])
    published = Pins(
        dp=gpus // (tp * pp),
        tp=tp,
        pp=pp,
        recompute=pins.recompute,
        micro_batch=int(mb) if mb else None,
        virtual_stages=int(v) if v else None,
        sequence_parallel=True if "sequence parallel" in row["recompute"] else None,
    )
    achieved, metric = _metric(row)
    return PublishedRow(row["model"], request, published, achieved, metric)


def load_published(path: str | Path) -> tuple[list[PublishedRow], list[tuple[str, str]]]:
    """``(usable rows, [(model, why skipped)])`` from published_layouts.csv."""
    rows, skipped = [], []
    with open(path, newline="") as fh:
        for row in csv.DictReader(fh):
            problem = row_problem(row)
            if problem:
                skipped.append((row["model"], problem))
            else:
                rows.append(to_published(row))
    return rows, skipped


def published_candidate(row: PublishedRow) -> Candidate:
    """The published layout, unknown fields (micro-batch, ZeRO, SP...) filled by the planner's
    best choice on the published degrees.

    Raises:
        PlanError: no variant of the published layout fits (a planner miss to report).
    """
    best = plan(row.request.replace(pins=row.published)).best
    if best is None:  # only a fully pinned layout that does not fit comes back without one
        raise PlanError(f"published layout of {row.name} ({row.published.to_dict()}) does not fit")
    return best


def achieved(row: PublishedRow) -> float:
    """``row.achieved``.

    Raises:
        PlanError: the row has no achieved TFLOP/s or MFU (nothing to compare a prediction with).
    """
    if row.achieved is None:
        raise PlanError(
            f"published row {row.name!r} has no achieved TFLOP/s or MFU; "
            f"fit only rows whose achieved is set"
        )
    return row.achieved


def predicted(row: PublishedRow, cand: Candidate, efficiency: float) -> float:
    """The planner's number comparable to ``row.achieved`` for ``cand`` at ``efficiency``."""
    est = estimate(row.request.replace(efficiency=efficiency), cand.layout)
    return {
        "hardware_tflops": est.hardware_tflops_per_gpu,
        "model_tflops": est.tflops_per_gpu,
        "mfu": est.mfu,
    }[row.metric]


def median(values: list[float]) -> float:
    """Median of a non-empty list."""
    s = sorted(values)
    mid = len(s) // 2
    return s[mid] if len(s) % 2 else (s[mid - 1] + s[mid]) / 2


def fit_efficiency(
    pairs: list[tuple[PublishedRow, Candidate]], lo: float = 0.2, hi: float = 1.0
) -> float:
    """Efficiency minimising the median ``|log(predicted/achieved)|`` (golden-section search).

    Raises:
        PlanError: ``pairs`` is empty.
    """
    if not pairs:
        raise PlanError("no published rows with achieved numbers to fit the efficiency to")

    def loss(eff: float) -> float:
        return median([abs(math.log(predicted(r, c, eff) / achieved(r))) for r, c in pairs])

    ratio = (math.sqrt(5) - 1) / 2
    for _ in range(40):
        a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
        lo, hi = (lo, b) if loss(a) <= loss(b) else (a, hi)
    return (lo + hi) / 2


def leave_one_out(pairs: list[tuple[PublishedRow, Candidate]]) -> list[float]:
    """Relative errors ``predicted/achieved - 1`` of each row with the efficiency fitted on the others."""
    errors = []
    for i, (row, cand) in enumerate(pairs):
        eff = fit_efficiency(pairs[:i] + pairs[i + 1 :])
        errors.append(predicted(row, cand, eff) / achieved(row) - 1)
    return errors
