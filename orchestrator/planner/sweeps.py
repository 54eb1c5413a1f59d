"""Measured layout sweeps as planner requests: the Aleph Alpha study (Hagemann et al. 2023).

``benchmarks/data/sweeps_aleph_alpha.csv`` holds every run of "Efficient Parallelization
Layouts for Large-Scale Distributed Model Training" (Hagemann et al., arXiv:2311.05610; the
authors' repository Aleph-Alpha/NeurIPS-WANT-submission-efficient-parallelization-layouts,
commit e13c2cb): LLaMA 13B/30B/65B at 2k and 8k tokens on 32-256 A100s, sweeping micro-batch,
tensor and pipeline degree, sequence parallelism, full recomputation and attention kernels,
with the measured step time or "OOM Error". One spreadsheet of the study is one *group*: a
model, a sequence length and a world size, the unit a user plans for.

Assumptions where the files and the text available to us are silent (the fixture's README
gives the evidence): A100 SXM4 80 GB, 8 per node, one 200 Gb/s HCA per GPU; global batch
2,048 sequences at 2k and 512 at 8k (about 4.2M tokens: what the logged TFLOP/s and step times
imply, :func:`implied_global_batch`); ZeRO-1 (optimizer state sharded over data parallelism, as
the Megatron-style framework of the study); bf16; "default" sequence length = LLaMA's 2,048.
Model shapes are LLaMA-1's (Touvron et al. 2023, Table 2; SwiGLU width of the released
checkpoints: 13,824 / 17,920 / 22,016).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from mla.config import ModelConfig
from orchestrator.contract.layout import Layout
from orchestrator.planner.types import PlanRequest

#: LLaMA-1 shapes: (layers, hidden, heads, SwiGLU width); vocabulary 32,000.
LLAMA1 = {
    "LLaMA 13B": (40, 5120, 40, 13824),
    "LLaMA 30B": (60, 6656, 52, 17920),
    "LLaMA 65B": (80, 8192, 64, 22016),
}
#: Sequences per optimizer step by sequence length (assumption, see the module docstring).
GLOBAL_BATCH = {2048: 2048, 8192: 512}
SWEEP_GPU = "a100-80gb"
SWEEP_ZERO_STAGE = 1


@dataclass(frozen=True)
class SweepRun:
    """One measured run: its group, the request and layout it ran, the kernel and the outcome.

    Attributes:
        group: ``"LLaMA 13B 2k 64 GPUs"``-style name of the spreadsheet the run comes from.
        request: The planner request (model, GPUs, batch, kernel flags) with every field pinned.
        layout: The layout that ran.
        kernel: The study's attention/norm kernel name (``flash_attention2 + RMS kernel``, ...).
        step_time_s: Measured seconds per optimizer step; ``None`` when it ran out of memory.
    """

    group: str
    request: PlanRequest
    layout: Layout
    kernel: str
    step_time_s: float | None

    @property
    def oom(self) -> bool:
        """True when the run ran out of memory."""
        return self.step_time_s is None


def llama1(name: str, seq_len: int) -> ModelConfig:
    """LLaMA-1 shape by study name (``"LLaMA 13B"``), dense attention, no dropout."""
    layers, h, heads, ffn = LLAMA1[name]
    return ModelConfig(
        vocab_size=32000,
        d_model=h,
        n_layers=layers,
        n_heads=heads,
        ffn_hidden=ffn,
        max_seq_len=seq_len,
        attention="dense",
    )


def _outcome(row: dict) -> tuple[bool, float | None]:
    """``(usable, step_time_s)``: OOM is usable with ``None``; other errors are not usable."""
    text = row["avg_step_time_s"].strip()
    if text == "OOM Error":
        return True, None
    try:
        return True, float(text)
    except ValueError:
        return False, None  # "Kernel not available", "Other Error"


def to_run(row: dict) -> SweepRun:
    """One CSV row as a :class:`SweepRun` (the row must be usable, see :func:`load_sweeps`)."""
    seq = 8192 if row["seq"].strip() == "8k" else 2048
    n, tp, pp, mb = (
        int(row[k]) for k in ("world_size", "tp(model_parallel_size)", "pp", "micro_batch")
    )
    batch, dp = GLOBAL_BATCH[seq], n // (tp * pp)
    layout = Layout(
        dp=dp,
        tp=tp,
        pp=pp,
        zero_stage=SWEEP_ZERO_STAGE,
        micro_batch=mb,
        grad_accum=batch // (dp * mb),
        recompute="full" if row["activation_checkpointing"] == "every_layer" else "none",
        sequence_parallel=row["sequence_parallel"].strip() == "1" and tp > 1,
    )
    kernel = row["kernel"].strip()
    request = PlanRequest(
        model=llama1(row["model"], seq),
        gpus=n,
        gpu=SWEEP_GPU,
        global_batch=batch,
        seq_len=seq,
        precision="bf16",
        flash_attention="flash" in kernel,
        allowed_zero_stages=(SWEEP_ZERO_STAGE,),
        kernel=kernel_class(kernel),
        fused_loss=False,
    )
    group = f"{row['model']} {seq // 1024}k {n} GPUs"
    return SweepRun(group, request, layout, kernel, _outcome(row)[1])


def kernel_class(kernel: str) -> str:
    """The study's kernel name as a :data:`orchestrator.planner.kernels.KERNELS` key."""
    k = kernel.lower()
    if "flash_attention2" in k:
        return "flash2+rms" if "rms" in k else "flash2"
    if "flash" in k:
        return "flash1"
    return "fused" if "fused" in k else "torch"


def load_sweeps(path: str | Path) -> list[SweepRun]:
    """Every usable run of the sweep CSV (OOM or measured; "Kernel not available" and
    "Other Error" rows, 20 of 984, are left out: they say nothing about memory or speed)."""
    with open(path, newline="") as fh:
        return [to_run(row) for row in csv.DictReader(fh) if _outcome(row)[0]]


def groups(runs: list[SweepRun]) -> dict[str, list[SweepRun]]:
    """Runs by group name, in file order."""
    out: dict[str, list[SweepRun]] = {}
    for run in runs:
        out.setdefault(run.group, []).append(run)
    return out
