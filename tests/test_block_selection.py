"""Block selection of the global branch (mla.block_selection) against a brute-force loop."""

from __future__ import annotations

import pytest
import torch

from mla.block_selection import (
    BlockSelection,
    block_scores,
    num_selected_blocks,
    pooled_queries,
    select_blocks,
    selection_token_mask,
)
from mla.reference import block_selection_reference_attention, reference_select_blocks

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# (seq, heads, kv_heads, global_k, block): ragged n, n_sel in {1, 2, > #blocks}, G in {1, 2, 4}, nb = 1.
CASES = [
    (37, 4, 4, 8, 8),
    (70, 4, 2, 20, 16),
    (64, 4, 1, 9, 8),
    (50, 2, 1, 500, 8),
    (5, 4, 2, 3, 8),
    (129, 4, 2, 16, 16),
]


def _qk(n, heads, kv, d=8, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return (
        torch.randn(2, heads, n, d, dtype=dtype, generator=gen),
        torch.randn(2, kv, n, d, dtype=dtype, generator=gen),
    )


@pytest.mark.parametrize("n,heads,kv,global_k,block", CASES)
def test_selection_equals_brute_force_loop(n, heads, kv, global_k, block):
    q, k = _qk(n, heads, kv)
    got, want = select_blocks(q, k, global_k, block), reference_select_blocks(q, k, global_k, block)
    assert got.indices.dtype == got.counts.dtype == torch.int64
    assert torch.equal(got.indices, want.indices) and torch.equal(got.counts, want.counts)


def test_selection_shapes_counts_and_padding():
    q, k = _qk(70, 4, 2)  # nb = 9 blocks of 8, n_sel = ceil(20 / 8) = 3
    idx, counts = select_blocks(q, k, 20, 8)
    assert idx.shape == (2, 2, 9, 3) and counts.shape == (2, 2, 9)
    assert counts[0, 0].tolist() == [0, 1, 2, 3, 3, 3, 3, 3, 3]
    col = torch.arange(3)
    valid = col < counts.unsqueeze(-1)
    assert (idx[~valid] == -1).all()  # padding after the valid ids
    blk = torch.arange(9).view(1, 1, 9, 1).expand_as(idx)
    assert ((idx < blk) & (idx >= 0))[valid].all()  # never J >= I
    assert all(
        len(set(row[:c].tolist())) == c
        for row, c in zip(idx.reshape(-1, 3), counts.reshape(-1), strict=False)
    )


def test_selection_is_best_first_by_group_score():
    q, k = _qk(96, 4, 2)
    idx, counts = select_blocks(q, k, 24, 8)
    scores = block_scores(q, k, 8)
    picked = scores.gather(-1, idx.clamp(min=0))
    valid = torch.arange(3) < counts.unsqueeze(-1)
    diffs = (picked[..., :-1] - picked[..., 1:])[valid[..., 1:]]
    assert (diffs >= 0).all()
    # the worst kept score is not below the best dropped earlier block
    for b, h, i in [(0, 0, 11), (1, 1, 7), (0, 1, 5)]:
        rest = [j for j in range(i) if j not in idx[b, h, i].tolist()]
        assert scores[b, h, i, rest].max() <= picked[b, h, i, 2]


def test_one_selection_is_shared_by_the_group_and_sums_its_scores():
    q, k = _qk(80, 4, 2)
    sel = select_blocks(q, k, 16, 8)
    # the group score is the sum of the per-head scores: selecting with head-summed queries on one
    # kv head equals selecting from a one-head query holding the sum of the group's queries
    summed = q.view(2, 2, 2, 80, 8).sum(2)
    assert torch.equal(select_blocks(summed, k, 16, 8).indices, sel.indices)
    mask = selection_token_mask(sel, 80, 8, 4)
    assert torch.equal(mask[:, 0], mask[:, 1]) and torch.equal(mask[:, 2], mask[:, 3])
    assert not torch.equal(mask[:, 1], mask[:, 2])
    # and it is not what one head alone would choose
    alone = select_blocks(q[:, :1], k[:, :1], 16, 8).indices
    assert not torch.equal(alone, sel.indices[:, :1])


def test_pooled_query_is_the_mean_of_the_block_queries_ending_at_its_first_position():
    q, _ = _qk(40, 2, 1)
    pooled = pooled_queries(q, 8, 1)
    assert torch.allclose(pooled[:, 0, 3], q[:, :, 17:25].mean(-2).sum(1))
    assert torch.allclose(pooled[:, 0, 0], q[:, :, 0].sum(1))  # only position 0 exists


@pytest.mark.parametrize("t", [16, 17, 23, 24, 41])
def test_selection_and_output_are_causal_bitwise(t):
    """Perturbing positions >= t changes neither the selection of any block starting before t nor
    any output before t, bitwise."""
    from mla.attention import multi_level_attention

    n, block = 48, 8
    q, k = _qk(n, 4, 2)
    v = torch.randn_like(k)
    gate = torch.rand(2, 4, n, dtype=torch.float64)
    q2, k2, v2, g2 = q.clone(), k.clone(), v.clone(), gate.clone()
    for x in (q2, k2, v2):
        x[:, :, t:] += 3 * torch.randn_like(x[:, :, t:])
    g2[..., t:] = torch.rand_like(g2[..., t:])
    s1, s2 = select_blocks(q, k, 16, block), select_blocks(q2, k2, 16, block)
    first_blocks = (t - 1) // block + 1  # blocks I with I*B <= t - 1: they read positions < t only
    assert torch.equal(s1.indices[:, :, :first_blocks], s2.indices[:, :, :first_blocks])

    def run(*x):
        return multi_level_attention(*x, window=6, top_k=16, indexer="block", block=block)

    base, moved = run(q, k, v, gate), run(q2, k2, v2, g2)
    assert torch.equal(moved[:, :, :t], base[:, :, :t])
    assert not torch.allclose(moved[:, :, t:], base[:, :, t:])


def test_token_mask_is_causal_and_covers_diagonal_plus_selected_blocks():
    q, k = _qk(45, 2, 2)
    sel = select_blocks(q, k, 8, 8)
    mask = selection_token_mask(sel, 45, 8, 2)
    i = torch.arange(45)
    assert not (mask & (i.view(1, -1) > i.view(-1, 1))).any()
    assert mask[0, 0, 44, 40:45].all() and mask[0, 0, 44].sum() == 5 + 8  # own block + one block
    j = int(sel.indices[0, 0, 5, 0])
    assert mask[0, 0, 40, j * 8 : (j + 1) * 8].all()


def test_bad_budget_or_block_raises():
    with pytest.raises(ValueError, match="global_k"):
        num_selected_blocks(0, 8)
    with pytest.raises(ValueError, match="block"):
        num_selected_blocks(8, 0)
    q, k = _qk(16, 3, 2)
    with pytest.raises(ValueError, match="multiple"):
        select_blocks(q, k, 8, 8)


def test_negative_control_a_future_block_in_the_selection_is_caught_by_the_reference():
    """The blocked path trusts the selection (selected blocks are attended without a causal mask);
    given a selection that lists a block J > I it leaks the future, and the dense reference, which
    masks ``j <= i`` token by token, no longer matches it."""
    from mla.global_attention import block_selection_attention

    q, k = _qk(40, 2, 1)
    v = torch.randn_like(k)
    only_global = torch.zeros(
        2, 2, 40, dtype=torch.float64
    )  # gate 0: the reference's global branch
    sel = select_blocks(q, k, 8, 8)

    def ref(s):
        return block_selection_reference_attention(
            q, k, v, only_global, window=4, selection=s, block=8
        )

    torch.testing.assert_close(
        block_selection_attention(q, k, v, sel, 8), ref(sel), rtol=1e-12, atol=1e-12
    )
    bad = sel.indices.clone()
    bad[:, :, 2, 0] = 4  # block 2 "selects" block 4
    leaked = BlockSelection(bad, sel.counts)
    assert (block_selection_attention(q, k, v, leaked, 8) - ref(leaked))[
        :, :, 16:24
    ].abs().max() > 1e-3
