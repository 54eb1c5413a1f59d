"""The cost model's free constants, fitted on measured runs (:mod:`.fit`), in one place.

Everything else in the memory and step-time model is counted from first principles (bytes,
FLOPs, link speeds; sources in each function). These few numbers stand for what cannot be
counted and were fitted on the Aleph Alpha sweeps (``benchmarks/planner.py`` prints the fit and
its leave-one-group-out validation; no constant is tuned to a single run):

* ``activation_scale``: measured activation memory / counted (allocator fragmentation,
  autograd temporaries; PyTorch's caching allocator rounds and splits blocks, so a run near
  the limit fails before the counted bytes reach it).
* ``loss_bytes_per_logit``: bytes per logit element ``s·b·V`` of the loss on the last stage,
  not split by tensor parallelism (bf16 logits, fp32 copy, softmax and its gradient).
* ``transient_layers``: peak extra of the backward pass, in units of one layer's full
  (non-recomputed) activations: the layer being recomputed or differentiated plus its gradient
  buffers.
* ``usable_memory_fraction``: share of the GPU's memory a training process can fill (CUDA
  context, NCCL buffers, allocator reserve).
* ``tp_link_fraction``: achieved share of the intra-node link bandwidth in tensor-parallel
  all-reduces of activations (NCCL bus bandwidth below the NVLink peak; the collectives contend
  with the GEMMs for SMs and HBM).
* ``efficiency``: achievable fraction of dense peak for GEMMs (hardware FLOPs), a field of the
  request (``PlanRequest.efficiency``), fitted on the published layouts (:mod:`.calibrate`).

Two more numbers are not fitted but measured from the held-out residuals
``log(measured/predicted)`` of the leave-one-group-out validation (:func:`.fit.residual_band`):
``step_time_band``, the central 80% of the residuals (a predicted step time ``t`` is expected in
``[t·e^low, t·e^high]``), and ``relative_error``, the central-80% half-width once each group's
common offset is removed: two layouts of one job whose predictions differ by less than that
cannot be told apart by the model.

Example:
    >>> CALIBRATED.usable_memory_fraction
    1.0
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class CostConstants:
    """Free constants of the memory and step-time model (see the module docstring)."""

    activation_scale: float = 1.0
    loss_bytes_per_logit: float = 0.0
    transient_layers: float = 0.0
    usable_memory_fraction: float = 1.0
    tp_link_fraction: float = 1.0
    step_time_band: tuple = (0.0, 0.0)
    relative_error: float = 0.0

    def replace(self, **changes: object) -> CostConstants:
        """Copy with ``changes`` applied."""
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


#: Uncalibrated: the counted model as it stood before the sweeps were used.
COUNTED = CostConstants()
#: Fitted on all ten Aleph Alpha groups (``benchmarks/planner.py --fit`` prints them).
CALIBRATED = CostConstants(
    activation_scale=1.4,
    loss_bytes_per_logit=56.0,
    transient_layers=2.0,
    usable_memory_fraction=1.0,
    tp_link_fraction=0.2,
    step_time_band=(-0.27, 0.09),
    relative_error=0.12,
)
#: Published Megatron-LM / NeMo / torchtitan runs on DGX-class nodes (published_layouts.csv): the
#: counted memory fits every published layout as it is, and their tensor-parallel collectives
#: reach the NVLink datasheet bandwidth the catalogue holds, so only the counted model applies.
#: The fitted memory transients and link share are properties of the sweeps' framework and
#: cluster (plain PyTorch loss, allocator settings, a slower intra-node path), which
#: :data:`CALIBRATED` carries to users as the conservative default.
MEGATRON_DGX = COUNTED
