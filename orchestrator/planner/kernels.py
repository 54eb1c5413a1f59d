"""Attention and normalisation kernels: what each costs in memory traffic and speed.

The Aleph Alpha study (Hagemann et al. 2023, arXiv:2311.05610 §3) compares five kernel sets on
the same layouts; they differ in three ways a first-principles model can count:

* **Score storage and traffic.** Without FlashAttention the ``s × s`` score and probability
  tensors are written to and read from HBM (Dao et al. 2022, arXiv:2205.14135 §2.2, Algorithm 0).
  Unfused PyTorch: write S, read/write it for scale+mask, read/write for softmax, read P for
  ``PV``: 12 bytes per score forward in 16-bit, about twice that backward (gradients of P and S),
  36 in all. Megatron's fused scale-mask-softmax writes S once, reads it and writes P once, and
  reads P: 8 forward, 24 in all. FlashAttention keeps the tiles in SRAM: 0.
* **Attention core speed.** FlashAttention-2 runs the attention matmuls at about the speed of a
  dense GEMM (50-73% of peak forward, Dao 2023, arXiv:2307.08691 §4.1), "around 2× faster than
  FlashAttention" (same, abstract): FA1 at half the GEMM rate. Unfused and fused softmax paths run
  the two matmuls as batched GEMMs (GEMM rate) plus the traffic above.
* **RMSNorm.** A PyTorch RMSNorm (``x.float()``, ``pow``, ``mean``, ``rsqrt``, two ``mul``)
  saves an fp32 copy of its input and of the normalised output for backward: 8 extra bytes per
  element per norm, two norms per block, ``16·s·b·h`` per layer, replicated across tensor-parallel
  ranks unless sequence parallelism splits them. Its ~6 elementwise passes move about
  ``UNFUSED_NORM_BYTES_PER_H`` more bytes per token and layer than a fused kernel (Aleph Alpha's
  "RMS kernel", apex ``FusedRMSNorm``).

Example:
    >>> KERNELS["torch"].score_bytes, KERNELS["flash2+rms"].norm_activation_bytes
    (36, 0)
"""

from __future__ import annotations

from dataclasses import dataclass

from orchestrator.contract.errors import PlanError

#: Extra HBM bytes per token and layer, in units of h, of two unfused RMSNorms against fused
#: ones: ~6 passes forward over 2-4 byte elements (~24 B), about twice that backward, ×2 norms,
#: ≈ 150 (fused: one read, one write forward and backward, already in ELEMENTWISE_BYTES_PER_H).
UNFUSED_NORM_BYTES_PER_H = 150


@dataclass(frozen=True)
class KernelSpec:
    """Cost traits of one kernel set.

    Attributes:
        name: Key in :data:`KERNELS`.
        flash: Stores no ``s × s`` scores (FlashAttention 1 or 2).
        attention_speed: Attention-core FLOP rate relative to the GEMM rate.
        score_bytes: HBM bytes moved per attention score element, forward + backward.
        norm_activation_bytes: Extra saved activation bytes per ``s·b·h`` and layer (unfused
            RMSNorm: 16).
        norm_traffic_bytes_per_h: Extra element-wise bytes per token and layer, in units of h.
    """

    name: str
    flash: bool
    attention_speed: float
    score_bytes: float
    norm_activation_bytes: float
    norm_traffic_bytes_per_h: float


KERNELS = {
    "flash2+rms": KernelSpec("flash2+rms", True, 1.0, 0, 0, 0),
    "flash2": KernelSpec("flash2", True, 1.0, 0, 16, UNFUSED_NORM_BYTES_PER_H),
    "flash1": KernelSpec("flash1", True, 0.5, 0, 16, UNFUSED_NORM_BYTES_PER_H),
    "fused": KernelSpec("fused", False, 1.0, 24, 16, UNFUSED_NORM_BYTES_PER_H),
    "torch": KernelSpec("torch", False, 1.0, 36, 16, UNFUSED_NORM_BYTES_PER_H),
}


def get_kernel(name: str) -> KernelSpec:
    """:data:`KERNELS` entry.

    Raises:
        PlanError: unknown name (the message lists the known ones).
    """
    if name not in KERNELS:
        raise PlanError(f"kernel={name!r} is not one of {', '.join(KERNELS)}")
    return KERNELS[name]
