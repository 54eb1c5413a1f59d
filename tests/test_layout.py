"""Rank arithmetic of :class:`orchestrator.contract.layout.Layout`: hand-checked golden groups, agreement with
DeepSpeed's ``PipeModelDataParallelTopology`` for shapes from 1 to 1,344 ranks."""

from __future__ import annotations

import pytest

from orchestrator.contract.layout import Layout, LayoutError
from workers.parallel.groups import layout_groups, topology_groups

# Hand-checked: rank = pp_rank * (dp * tp) + dp_rank * tp + tp_rank (tensor fastest).
GOLDEN = {
    # 8 ranks, dp=2 tp=2 pp=2 (the example of Megatron-LM's initialize_model_parallel docstring).
    (2, 2, 2): {
        "tp": [[0, 1], [2, 3], [4, 5], [6, 7]],
        "dp": [[0, 2], [1, 3], [4, 6], [5, 7]],
        "pp": [[0, 4], [1, 5], [2, 6], [3, 7]],
    },
    # 8 ranks, dp=1 tp=4 pp=2: one replica, two stages of four tensor ranks.
    (1, 4, 2): {
        "tp": [[0, 1, 2, 3], [4, 5, 6, 7]],
        "dp": [[0], [1], [2], [3], [4], [5], [6], [7]],
        "pp": [[0, 4], [1, 5], [2, 6], [3, 7]],
    },
    # 16 ranks, dp=2 tp=2 pp=4 (Megatron-LM's 16-GPU example: tp groups of 2, pp groups of 4).
    (2, 2, 4): {
        "tp": [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9], [10, 11], [12, 13], [14, 15]],
        "dp": [[0, 2], [1, 3], [4, 6], [5, 7], [8, 10], [9, 11], [12, 14], [13, 15]],
        "pp": [[0, 4, 8, 12], [1, 5, 9, 13], [2, 6, 10, 14], [3, 7, 11, 15]],
    },
    # 16 ranks, dp=4 tp=4 pp=1.
    (4, 4, 1): {
        "tp": [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15]],
        "dp": [[0, 4, 8, 12], [1, 5, 9, 13], [2, 6, 10, 14], [3, 7, 11, 15]],
        "pp": [[r] for r in range(16)],
    },
}


@pytest.mark.parametrize("shape", sorted(GOLDEN))
def test_groups_match_hand_checked_golden(shape):
    dp, tp, pp = shape
    layout = Layout(dp=dp, tp=tp, pp=pp)
    assert layout_groups(layout) == GOLDEN[shape]


@pytest.mark.parametrize(
    "shape",
    [
        (1, 1, 1),
        (8, 1, 1),
        (2, 2, 2),
        (2, 2, 4),
        (4, 4, 4),
        (2, 8, 4),
        (16, 4, 1),
        (1, 8, 8),
        (3, 2, 5),
        (8, 8, 21),
    ],
)  # last: 1,344 ranks (dp8 tp8 pp21)
def test_groups_agree_with_deepspeed_topology(shape):
    dp, tp, pp = shape
    layout = Layout(dp=dp, tp=tp, pp=pp)
    assert layout_groups(layout) == topology_groups(layout)


@pytest.mark.parametrize("shape", [(2, 2, 2), (8, 8, 21), (3, 2, 5)])
def test_groups_partition_the_ranks_and_coords_invert(shape):
    dp, tp, pp = shape
    layout = Layout(dp=dp, tp=tp, pp=pp)
    for name, size in (("tp", tp), ("dp", dp), ("pp", pp)):
        groups = layout_groups(layout)[name]
        assert sorted(r for g in groups for r in g) == list(range(layout.world_size))
        assert {len(g) for g in groups} == {size}
    for rank in range(layout.world_size):
        assert layout.rank_of(*layout.coords(rank)) == rank


def test_megatron_1344_rank_shape_hand_checked_ranks():
    layout = Layout(dp=8, tp=8, pp=21)  # 1,344 ranks; one stage spans 8 * 8 = 64 ranks
    assert layout.coords(1343) == (20, 7, 7)
    assert layout.coords(5 * 64 + 3 * 8 + 1) == (5, 3, 1)
    assert [1 + 64 * p for p in range(21)] in layout.pp_groups()
    assert [1281 + 8 * d for d in range(8)] in layout.dp_groups()  # 1281 = stage 20, dp 0, tp 1
    assert list(range(1336, 1344)) in layout.tp_groups()


@pytest.mark.parametrize(
    "kwargs, reason",
    [
        ({"pp": 2, "zero_stage": 3}, "zero_stage=3 with pp=2"),
        ({"pp": 2, "zero_stage": 2}, "zero_stage=2 with pp=2"),
        ({"tp": 0}, "tp=0"),
        ({"virtual_stages": 2}, "virtual_stages=2 needs pp > 1"),
    ],
)
def test_invalid_layouts_raise_with_the_reason(kwargs, reason):
    with pytest.raises(LayoutError, match=reason):
        Layout(**kwargs)
