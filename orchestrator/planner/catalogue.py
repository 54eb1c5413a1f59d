"""GPU catalogue: peak FLOP/s, memory and link speeds, each with its source.

Peaks are dense (no 2:4 sparsity) tensor-core FLOP/s; memory is what the framework can see, in
GiB (``nvidia-smi`` MiB / 1024); link speeds are per GPU, one direction, in GB/s (1e9 B/s):
``intra_node_gbs`` is NVLink/PCIe inside a node (used by tensor-parallel all-reduces),
``inter_node_gbs`` the network share of one GPU (data-parallel and pipeline traffic between
nodes). Sources are in each entry (formulas.md §6 collects the quotes).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from orchestrator.contract.errors import PlanError

PRECISIONS = ("bf16", "fp16", "fp32")


@dataclass(frozen=True)
class GpuSpec:
    """One accelerator model.

    Attributes:
        name: Catalogue key (lower case), e.g. ``"h100"``.
        peak_tflops: Dense peak per precision, TFLOP/s: ``{"bf16": 989.4, ...}``; a missing
            precision is unsupported (the T4 has no bf16 tensor cores).
        memory_gib: Memory usable by one process, GiB.
        intra_node_gbs: Per-GPU intra-node bandwidth, GB/s, one direction.
        inter_node_gbs: Per-GPU inter-node bandwidth, GB/s, one direction.
        hbm_tbs: Memory bandwidth, TB/s (element-wise kernels are bound by it).
        gpus_per_node: Usual GPUs per node (HGX/DGX boards have 8).
        source: Where the numbers come from.

    Example:
        >>> get_gpu("a100-80gb").peak_flops("bf16")
        312000000000000.0
    """

    name: str
    peak_tflops: dict
    memory_gib: float
    intra_node_gbs: float
    inter_node_gbs: float
    hbm_tbs: float = 2.0
    gpus_per_node: int = 8
    source: str = ""

    def peak_flops(self, precision: str) -> float:
        """Dense peak in FLOP/s for ``precision``.

        Raises:
            PlanError: the precision is unknown or the device has no tensor cores for it.
        """
        if precision not in PRECISIONS:
            raise PlanError(f"precision={precision!r} is not one of {', '.join(PRECISIONS)}")
        if precision not in self.peak_tflops:
            supported = ", ".join(self.peak_tflops)
            raise PlanError(
                f"{self.name} has no {precision} peak in the catalogue; use one of: {supported}"
            )
        return self.peak_tflops[precision] * 1e12

    def replace(self, **changes: Any) -> GpuSpec:
        """Copy with custom values (``memory_gib=96``); ``None`` values are ignored."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})


_NV_A100 = (
    "NVIDIA A100 datasheet (dense FP16/BF16 312 TF, TF32-free FP32 19.5 TF; NVLink3 600 GB/s "
    "total = 300 GB/s per direction; HBM 1.555 TB/s (40 GB), 2.039 TB/s (80 GB)); DGX A100: one 200 Gb/s HDR HCA per GPU (Narayanan et al. "
    "SC21 §5) = 25 GB/s"
)
_NV_H100 = (
    "NVIDIA H100 SXM5 product page (BF16 1,979 TF with sparsity = 989.4 dense; FP32 67 TF; NVLink4 "
    "900 GB/s total = 450 per direction; HBM3 3.35 TB/s); DGX H100: 8 x 400 Gb/s ConnectX-7 = 50 GB/s per GPU "
    "(NVIDIA DGX BasePOD reference architecture); 80 GB HBM3 = 79.6 GiB visible"
)

#: Known devices. Keys are lower case; :func:`get_gpu` also accepts common aliases.
GPU_CATALOGUE: dict[str, GpuSpec] = {
    "a100-40gb": GpuSpec(
        "a100-40gb",
        {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5},
        40.0,
        300.0,
        25.0,
        1.555,
        source=_NV_A100 + "; 40 GB HBM2",
    ),
    "a100-80gb": GpuSpec(
        "a100-80gb",
        {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5},
        80.0,
        300.0,
        25.0,
        2.039,
        source=_NV_A100 + "; 80 GB HBM2e",
    ),
    "h100": GpuSpec(
        "h100",
        {"bf16": 989.4, "fp16": 989.4, "fp32": 67.0},
        79.6,
        450.0,
        50.0,
        3.35,
        source=_NV_H100,
    ),
    "h100-96gb": GpuSpec(
        "h100-96gb",
        {"bf16": 989.4, "fp16": 989.4, "fp32": 67.0},
        94.0,
        450.0,
        50.0,
        2.4,
        source="torchtitan benchmarks/llama3_h100_202412_torchtitan.md (Grand Teton H100, "
        "96 GB HBM2e 2.4 TB/s, 500 W cap, 400 Gb/s RDMA per GPU); peak as H100 SXM",
    ),
    "h200": GpuSpec(
        "h200",
        {"bf16": 989.4, "fp16": 989.4, "fp32": 67.0},
        140.4,
        450.0,
        50.0,
        4.8,
        source="MLCommons inference v4.1 system 'NVIDIA H200-SXM-141GB' (18x NVLink4, 900 GB/s; HBM3e 4.8 TB/s); "
        "same compute die as H100 SXM; DGX H200 8 x 400 Gb/s ConnectX-7",
    ),
    "l4": GpuSpec(
        "l4",
        {"bf16": 121.0, "fp16": 121.0, "fp32": 30.3},
        22.5,
        32.0,
        3.125,
        0.3,
        source="NVIDIA L4 datasheet (FP16/BF16 242 TF with sparsity = 121 dense, FP32 30.3 TF, "
        "24 GB GDDR6 300 GB/s, PCIe Gen4 x16 64 GB/s total); GCP g2-standard-96: 8 L4, 100 Gb/s",
    ),
    "t4": GpuSpec(
        "t4",
        {"fp16": 65.0, "fp32": 8.1},
        15.0,
        16.0,
        3.125,
        0.32,
        source="NVIDIA T4 datasheet (FP16 65 TF mixed precision, FP32 8.1 TF, 16 GB GDDR6 320 GB/s, "
        "PCIe Gen3 x16 32 GB/s total, no bf16 tensor cores); 100 Gb/s per 8-GPU node",
    ),
    "cpu": GpuSpec(
        "cpu",
        {"bf16": 0.1, "fp16": 0.1, "fp32": 0.1},
        4.0,
        5.0,
        1.25,
        0.02,
        source="local runs: one Ray worker process on ~2 AVX2 cores (~0.1 TFLOP/s), 4 GiB per "
        "worker, ~20 GB/s DRAM share, gloo over shared memory (~5 GB/s) or 10 GbE (1.25 GB/s); rough by design",
    ),
}

_ALIASES = {
    "a100": "a100-80gb",
    "a100-80": "a100-80gb",
    "a100-40": "a100-40gb",
    "h100-80gb": "h100",
    "h100-sxm": "h100",
    "h200-141gb": "h200",
}


def get_gpu(name: str, **custom: object) -> GpuSpec:
    """Catalogue entry for ``name`` (case-insensitive), with optional custom values.

    Args:
        name: A catalogue key or alias (``a100`` = ``a100-80gb``).
        **custom: Fields to override, e.g. ``memory_gib=96``, ``peak_tflops={"bf16": 900}``.

    Raises:
        PlanError: ``name`` is unknown; the message lists the known names.

    Example:
        >>> get_gpu("H100", memory_gib=94).memory_gib
        94
    """
    key = _ALIASES.get(name.lower(), name.lower())
    if key not in GPU_CATALOGUE:
        raise PlanError(
            f"unknown GPU {name!r}; known GPUs: {', '.join(GPU_CATALOGUE)} "
            f"(aliases: {', '.join(_ALIASES)}), or give custom values"
        )
    return GPU_CATALOGUE[key].replace(**custom)
