"""Plan requests and results: plain frozen dataclasses (the controller's Python API)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from mla.config import ModelConfig
from orchestrator.contract.errors import PlanError
from orchestrator.contract.layout import Layout, Recompute
from orchestrator.planner.catalogue import GpuSpec, get_gpu
from orchestrator.planner.constants import CALIBRATED, CostConstants
from orchestrator.planner.kernels import get_kernel
from orchestrator.planner.memory import GIB, MemoryBreakdown
from orchestrator.planner.step_time import DEFAULT_EFFICIENCY, StepTime

PIN_FIELDS = (
    "dp",
    "tp",
    "pp",
    "zero_stage",
    "micro_batch",
    "recompute",
    "sequence_parallel",
    "virtual_stages",
)


@dataclass(frozen=True)
class Pins:
    """Layout fields fixed by the user; ``None`` leaves a field to the search."""

    dp: int | None = None
    tp: int | None = None
    pp: int | None = None
    zero_stage: int | None = None
    micro_batch: int | None = None
    recompute: Recompute | None = None
    sequence_parallel: bool | None = None
    virtual_stages: int | None = None

    def complete(self) -> bool:
        """True when every field is pinned (``mla plan --estimate``)."""
        return all(getattr(self, f) is not None for f in PIN_FIELDS)

    def allows(self, name: str, value: object) -> bool:
        """True when ``name`` is free or pinned to ``value``."""
        pinned = getattr(self, name)
        return pinned is None or pinned == value

    def to_dict(self) -> dict:
        """Pinned fields only."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


@dataclass(frozen=True)
class PlanRequest:
    """What to plan for.

    Attributes:
        model: Model shape (:class:`mla.config.ModelConfig`).
        gpus: Number of GPUs (or CPU workers), N.
        gpu: Catalogue name or a :class:`GpuSpec` (custom values).
        global_batch: Sequences per optimizer step, B.
        seq_len: Tokens per sequence; ``None`` uses ``model.max_seq_len``.
        gpus_per_node: GPUs per node, G; ``None`` uses the catalogue's (8), capped at ``gpus``.
        precision: ``bf16``, ``fp16`` or ``fp32``.
        pins: Fixed layout fields.
        efficiency: Achievable fraction of peak for hardware FLOPs.
        flash_attention: Dense attention stores no s×s scores (FlashAttention / SDPA).
        overlap_dp: Data-parallel gradient traffic overlaps the backward pass.
        overlap_param_gather: The ZeRO-1/2 parameter all-gather after the optimizer step overlaps
            the next forward pass (Megatron-Core ``--overlap-param-gather``; DeepSpeed: no).
        overlap_tp: Tensor-parallel collectives are decomposed and overlapped with their GEMMs
            (Megatron-Core ``--tp-comm-overlap``, PyTorch async TP); DeepSpeed/``workers``: no.
        kernel: Attention/norm kernel set (:data:`.kernels.KERNELS`): ``flash2+rms`` (FlashAttention-2
            and a fused RMSNorm, the default), ``flash2``, ``flash1``, ``fused`` or ``torch``.
            Its time costs (score traffic, FA1 speed, unfused norms) apply as named;
            ``flash_attention`` alone sets only the score *memory* (the published rows keep the
            default kernel: their efficiency of 0.53 was fitted without score traffic).
        fused_loss: The loss is Megatron's vocab-parallel fused cross-entropy (logits split by tp,
            no fp32 copies); ``False`` for a plain full-vocabulary loss, which adds
            ``constants.loss_bytes_per_logit`` bytes per logit on the last stage (the Aleph Alpha
            runs are fitted best that way).
        constants: The cost model's fitted constants (:data:`.constants.CALIBRATED`).
        allowed_zero_stages: ZeRO stages the training framework offers, a constraint of the
            request like the precision: ``None`` = DeepSpeed's 0-3 (0-1 with pipelines);
            ``(0, 1)`` for Megatron-LM, NeMo and GPT-NeoX, whose distributed optimizer shards only
            the optimizer state (ZeRO-1-like; Megatron-LM README "Distributed Optimizer").
            With pipelines stages 2-3 are never searched (DeepSpeed's pipeline engine, which
            ``workers/`` runs, supports 0-1; ``orchestrator.contract.layout.Layout`` enforces it).
    """

    model: ModelConfig
    gpus: int
    gpu: GpuSpec | str = "cpu"
    global_batch: int = 32
    seq_len: int | None = None
    gpus_per_node: int | None = None
    precision: str = "bf16"
    pins: Pins = field(default_factory=Pins)
    efficiency: float = DEFAULT_EFFICIENCY
    flash_attention: bool = True
    overlap_dp: bool = True
    overlap_param_gather: bool = False
    overlap_tp: bool = False
    allowed_zero_stages: tuple | None = None
    fp32_main_grads: bool = False
    kernel: str = "flash2+rms"
    fused_loss: bool = True
    constants: CostConstants = CALIBRATED

    def __post_init__(self) -> None:
        if isinstance(self.gpu, str):
            object.__setattr__(self, "gpu", get_gpu(self.gpu))
        if self.seq_len is None:
            object.__setattr__(self, "seq_len", self.model.max_seq_len)
        self.gpu_spec.peak_flops(self.precision)  # raises PlanError on an unsupported precision
        get_kernel(self.kernel)  # raises PlanError on an unknown kernel
        for name in ("gpus", "global_batch", "seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise PlanError(
                    f"{name}={value!r} must be a positive integer (e.g. --{name.replace('_', '-')} 8)"
                )
        if self.gpus_per_node is not None and self.gpus_per_node < 1:
            raise PlanError(f"gpus_per_node={self.gpus_per_node} must be >= 1")
        if not 0 < self.efficiency <= 1:
            raise PlanError(f"efficiency={self.efficiency} must be in (0, 1]")
        if self.allowed_zero_stages is not None:
            stages = tuple(sorted(set(self.allowed_zero_stages)))
            if not stages or any(z not in (0, 1, 2, 3) for z in stages):
                raise PlanError(
                    f"allowed_zero_stages={self.allowed_zero_stages!r} must be a non-empty set of "
                    f"ZeRO stages 0-3, e.g. (0, 1) for Megatron-LM"
                )
            object.__setattr__(self, "allowed_zero_stages", stages)
            if self.pins.zero_stage is not None and self.pins.zero_stage not in stages:
                raise PlanError(
                    f"pinned zero_stage={self.pins.zero_stage} is not in allowed_zero_stages={stages}; "
                    f"pin one of {stages} or widen allowed_zero_stages"
                )

    def zero_allowed(self, stage: int, pp: int) -> bool:
        """True when ZeRO ``stage`` may be used with ``pp`` pipeline stages.

        Pins and ``allowed_zero_stages`` restrict the stage; with pipelines only stages 0-1 are
        searched (DeepSpeed's pipeline engine) unless a pin names the stage (the layout check then
        reports why it cannot run).

        Example:
            >>> from mla.config import PRESETS
            >>> req = PlanRequest(model=PRESETS["tiny"], gpus=2, gpu="cpu", global_batch=32)
            >>> req.replace(allowed_zero_stages=(0, 1)).zero_allowed(3, 1)
            False
        """
        if not self.pins.allows("zero_stage", stage):
            return False
        if self.allowed_zero_stages is not None and stage not in self.allowed_zero_stages:
            return False
        return pp == 1 or stage <= 1 or self.pins.zero_stage == stage

    @property
    def node_size(self) -> int:
        """GPUs per node, G (at most ``gpus``)."""
        return min(self.gpus_per_node or self.gpu_spec.gpus_per_node, self.gpus)

    @property
    def gpu_spec(self) -> GpuSpec:
        """``gpu`` as a :class:`GpuSpec` (``__post_init__`` resolves a catalogue name)."""
        assert isinstance(self.gpu, GpuSpec), "PlanRequest.__post_init__ resolves gpu"
        return self.gpu

    @property
    def seq_tokens(self) -> int:
        """``seq_len`` as an int (``__post_init__`` replaces ``None`` by ``model.max_seq_len``)."""
        assert self.seq_len is not None, "PlanRequest.__post_init__ resolves seq_len"
        return self.seq_len

    def replace(self, **changes: Any) -> PlanRequest:
        """Copy with ``changes`` applied."""
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class Estimate:
    """Predicted memory and speed of one layout.

    ``tflops_per_gpu`` and ``mfu`` count model FLOPs (6N + attention, PaLM App. B, no
    recomputation); ``hardware_tflops_per_gpu`` and ``hfu`` include recomputation.
    """

    memory: MemoryBreakdown
    memory_limit_gib: float
    time: StepTime
    tokens_per_s: float
    tflops_per_gpu: float
    hardware_tflops_per_gpu: float
    mfu: float
    hfu: float
    step_time_band: tuple = (0.0, 0.0)

    @property
    def step_time_interval_s(self) -> tuple[float, float]:
        """``(low, high)`` seconds per step: the prediction times the calibration residual band
        (:attr:`.constants.CostConstants.step_time_band`, central 80% of held-out residuals).

        Example: 10 s with band (-0.27, 0.09) → (7.63, 10.94).
        """
        low, high = self.step_time_band
        return self.step_time_s * math.exp(low), self.step_time_s * math.exp(high)

    @property
    def fits(self) -> bool:
        """True when the total fits in the GPU's memory."""
        return self.memory.total <= self.memory_limit_gib * GIB

    @property
    def step_time_s(self) -> float:
        """Seconds per optimizer step."""
        return self.time.total

    @property
    def reason(self) -> str:
        """Why it does not fit (empty when it fits), e.g. ``total 91.2 GiB > 80 GiB (...)``."""
        if self.fits:
            return ""
        name, value = self.memory.largest_part()
        return (
            f"total {self.memory.total / GIB:.1f} GiB > {self.memory_limit_gib:g} GiB "
            f"(largest part: {name} {value / GIB:.1f} GiB)"
        )

    def to_dict(self) -> dict:
        """JSON form: ``memory_gib``, ``fits``, ``step_time_s``, ``tokens_per_s``, ... ."""
        return {
            "memory_gib": self.memory.gib(),
            "memory_limit_gib": self.memory_limit_gib,
            "fits": self.fits,
            "reason": self.reason,
            "step_time_s": round(self.step_time_s, 6),
            "step_time_interval_s": [round(v, 6) for v in self.step_time_interval_s],
            "tokens_per_s": round(self.tokens_per_s, 1),
            "tflops_per_gpu": round(self.tflops_per_gpu, 2),
            "hardware_tflops_per_gpu": round(self.hardware_tflops_per_gpu, 2),
            "mfu": round(self.mfu, 4),
            "hfu": round(self.hfu, 4),
            "flops": "model FLOPs: 6N + attention (PaLM App. B); hfu adds recompute",
            "time_s": self.time.to_dict(),
        }


@dataclass(frozen=True)
class Candidate:
    """A layout, its estimate and why it was chosen (or rejected)."""

    layout: Layout
    estimate: Estimate
    reason: str = ""

    def to_dict(self) -> dict:
        """``{"layout": {...}, "estimate": {...}, "reason": ...}``."""
        return {
            "layout": self.layout.to_dict(),
            "estimate": self.estimate.to_dict(),
            "reason": self.reason,
        }


@dataclass(frozen=True)
class Rejection:
    """A layout (possibly partial: only the degrees) and why it cannot run."""

    layout: dict
    reason: str

    def to_dict(self) -> dict:
        """``{"layout": {...}, "reason": ...}``."""
        return {"layout": self.layout, "reason": self.reason}


@dataclass(frozen=True)
class PlanResult:
    """Outcome of :func:`orchestrator.planner.plan`.

    Attributes:
        request: The request planned for.
        best: The chosen layout (``None`` only in estimate mode when it does not fit).
        candidates: Fitting layouts, best first.
        rejected: Layouts that cannot run, with the reason.
        estimate: In estimate mode (every field pinned), the evaluated layout.
        notes: Remarks (e.g. fewer workers used than offered).
        close_call: When the best layout on other degrees is predicted within the model's error
            of ``best``: what to measure (``search.close_call_note``); '' otherwise.
    """

    request: PlanRequest
    best: Candidate | None
    candidates: list = field(default_factory=list)
    rejected: list = field(default_factory=list)
    estimate: Candidate | None = None
    notes: tuple = ()
    close_call: str = ""

    def to_json(self, limit: int | None = 20) -> dict:
        """One JSON-able document: ``best``, ``candidates`` (ranked), ``rejected``, ``estimate``."""
        from orchestrator.planner.shapes import describe_model

        req = self.request
        return {
            "request": {
                "model": describe_model(req.model),
                "gpus": req.gpus,
                "gpu": req.gpu_spec.name,
                "gpus_per_node": req.node_size,
                "global_batch": req.global_batch,
                "seq_len": req.seq_len,
                "precision": req.precision,
                "pins": req.pins.to_dict(),
                "efficiency": req.efficiency,
                "allowed_zero_stages": list(req.allowed_zero_stages)
                if req.allowed_zero_stages
                else None,
            },
            "best": self.best.to_dict() if self.best else None,
            "candidates": [c.to_dict() for c in self.candidates[:limit]],
            "num_candidates": len(self.candidates),
            "rejected": [r.to_dict() for r in self.rejected[:limit]],
            "num_rejected": len(self.rejected),
            "estimate": self.estimate.to_dict() if self.estimate else None,
            "notes": list(self.notes),
            "close_call": self.close_call,
        }
