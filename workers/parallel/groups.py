"""Process groups for a layout, and the ``mpu`` object that tells DeepSpeed about them.

The rank grid comes from DeepSpeed's ``PipeModelDataParallelTopology`` (axes ``pipe, data,
model``: the tensor rank varies fastest). :func:`topology_groups` reads the groups off it and
:func:`build_groups` refuses to run if they differ from the pure arithmetic of
:class:`orchestrator.contract.layout.Layout` (which the layout tests check against hand-written groups), so
the planner, the workers and DeepSpeed agree on which rank holds what.

Example (dp=2, tp=2, pp=2): rank 5 has coordinates ``(pp=1, dp=0, tp=1)``; its tensor group is
``[4, 5]``, its data group ``[5, 7]``, its pipeline group ``[1, 5]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist

from orchestrator.contract.layout import Layout


def topology(layout: Layout):
    """DeepSpeed's ``PipeModelDataParallelTopology`` for ``layout`` (``model`` = tensor axis)."""
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    return PipeModelDataParallelTopology(num_pp=layout.pp, num_mp=layout.tp, num_dp=layout.dp)


def topology_groups(layout: Layout) -> dict[str, list[list[int]]]:
    """``{"tp": ..., "dp": ..., "pp": ...}`` rank groups as DeepSpeed's topology lists them."""
    topo = topology(layout)
    return {
        name: sorted(topo.get_axis_comm_lists(axis))
        for name, axis in (("tp", "model"), ("dp", "data"), ("pp", "pipe"))
    }


def layout_groups(layout: Layout) -> dict[str, list[list[int]]]:
    """The same groups from :class:`Layout`'s pure rank arithmetic."""
    return {
        "tp": sorted(layout.tp_groups()),
        "dp": sorted(layout.dp_groups()),
        "pp": sorted(layout.pp_groups()),
    }


@dataclass
class ParallelGroups:
    """This rank's coordinates and process groups; also the ``mpu`` handed to DeepSpeed.

    DeepSpeed calls ``get_model_parallel_*`` (our tensor group: gradient-norm reduction and ZeRO)
    and ``get_data_parallel_*`` (gradient averaging and ZeRO partitioning).

    Attributes:
        layout: The layout.
        rank: Global rank.
        pp_rank, dp_rank, tp_rank: Coordinates of ``rank``.
        tp_group, dp_group, pp_group: ``torch.distributed`` groups holding ``rank``.
    """

    layout: Layout
    rank: int
    pp_rank: int
    dp_rank: int
    tp_rank: int
    tp_group: object
    dp_group: object
    pp_group: object

    # --- the mpu interface DeepSpeed uses (model parallel = tensor parallel here)
    def get_model_parallel_rank(self) -> int:
        return self.tp_rank

    def get_model_parallel_world_size(self) -> int:
        return self.layout.tp

    def get_model_parallel_group(self):
        return self.tp_group

    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_group = get_model_parallel_group

    def get_data_parallel_rank(self) -> int:
        return self.dp_rank

    def get_data_parallel_world_size(self) -> int:
        return self.layout.dp

    def get_data_parallel_group(self):
        return self.dp_group

    def get_pipeline_model_parallel_rank(self) -> int:
        return self.pp_rank

    def get_pipeline_model_parallel_world_size(self) -> int:
        return self.layout.pp

    def get_pipeline_model_parallel_group(self):
        return self.pp_group


def build_groups(layout: Layout) -> ParallelGroups:
    """Create every tensor, data and pipeline group (collective: all ranks call it in order).

    Raises:
        RuntimeError: the process group's world size differs from the layout's, or DeepSpeed's
            topology disagrees with :class:`Layout`'s rank arithmetic.
    """
    world, rank = dist.get_world_size(), dist.get_rank()
    layout.check_world_size(world)
    ours, theirs = layout_groups(layout), topology_groups(layout)
    if ours != theirs:
        raise RuntimeError(
            f"rank grid mismatch for {layout.describe()}: Layout {ours} != DeepSpeed {theirs}"
        )
    mine = {}
    for name in ("tp", "dp", "pp"):
        for ranks in ours[name]:
            group = dist.new_group(ranks)  # every rank creates every group, in the same order
            if rank in ranks:
                mine[name] = group
    pp_rank, dp_rank, tp_rank = layout.coords(rank)
    return ParallelGroups(
        layout, rank, pp_rank, dp_rank, tp_rank, mine["tp"], mine["dp"], mine["pp"]
    )
