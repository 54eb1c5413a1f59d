"""FlexAttention path of the block selection (mla.flex_attention), checked on CPU.

Recipes of GPU-DESIGN.md §4.1: (1) eager flex's dense math path, with its CPU device check
bypassed, against the dense masked reference in float64, outputs and gradients of q, k, v and the
gate; (2) compiled CPU flex (which reads the block lists) equal to eager flex (which reads only
``mask_mod``) on the same BlockMask; (3) ``BlockMask.to_dense()`` against the expected block
pattern, and every full block entirely inside the mask; (4) the whole core compiles with
``fullgraph=True`` and does not recompile on new values. Plus negative controls that must fail.
"""

from __future__ import annotations

import pytest
import torch

fa = pytest.importorskip("torch.nn.attention.flex_attention")

from mla.block_selection import BlockSelection, select_blocks  # noqa: E402
from mla.flex_attention import (  # noqa: E402
    mla_core,
    selection_block_mask,
    window_block_mask,
    window_block_tables,
)
from mla.reference import block_selection_reference_attention  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def cpu_flex_backward(monkeypatch):
    """Let eager flex run its dense autograd path on CPU (private API; noticed if it changes)."""
    if not hasattr(fa, "_validate_device"):
        pytest.skip(
            "torch.nn.attention.flex_attention._validate_device is gone: revisit this recipe"
        )
    monkeypatch.setattr(fa, "_validate_device", lambda *args: None)


def _inputs(n, heads, kv, d=8, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(2, heads, n, d, dtype=dtype, generator=gen)
    k = torch.randn(2, kv, n, d, dtype=dtype, generator=gen)
    v = torch.randn(2, kv, n, d, dtype=dtype, generator=gen)
    gate = torch.rand(2, heads, n, dtype=dtype, generator=gen)
    return [t.requires_grad_() for t in (q, k, v, gate)]


def _grads(out, inputs):
    weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
    return torch.autograd.grad((out * weights).sum(), inputs)


def test_cpu_flex_backward_is_still_refused_without_the_bypass():
    q, k, v, _ = _inputs(16, 2, 2)
    with pytest.raises(NotImplementedError, match="backward on CPU"):
        fa.flex_attention(q, k, v)


# (seq, block, window, global_k, heads, kv_heads): ragged n, w in {1, B-1, B, >= n},
# n_sel in {1, 2, > #blocks}, G = Hq/Hkv in {1, 2, 4}.
CASES = [
    (100, 16, 1, 16, 4, 4),
    (100, 16, 15, 20, 4, 2),
    (128, 16, 16, 16, 4, 1),
    (70, 16, 90, 200, 2, 1),
    (37, 8, 9, 9, 4, 2),
    (16, 16, 4, 16, 2, 2),
]


@pytest.mark.parametrize("n,block,w,global_k,heads,kv", CASES)
def test_flex_core_matches_dense_reference_in_fp64_with_gradients(
    cpu_flex_backward, n, block, w, global_k, heads, kv
):
    q, k, v, gate = _inputs(n, heads, kv)
    out = mla_core(
        q, k, v, gate, window_block_mask(n, w, block, "cpu"), top_k=global_k, block=block
    )
    sel = select_blocks(q, k, global_k, block)
    ref = block_selection_reference_attention(q, k, v, gate, window=w, selection=sel, block=block)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    for got, want in zip(_grads(out, (q, k, v, gate)), _grads(ref, (q, k, v, gate)), strict=False):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_negative_control_off_by_one_window_is_caught(cpu_flex_backward):
    q, k, v, gate = _inputs(64, 2, 2)
    out = mla_core(q, k, v, gate, window_block_mask(64, 9, 16, "cpu"), top_k=16, block=16)
    sel = select_blocks(q, k, 16, 16)
    ref = block_selection_reference_attention(q, k, v, gate, window=8, selection=sel, block=16)
    assert (out - ref).abs().max() > 1e-3


def _block_pattern(block_mask) -> torch.Tensor:
    """``(b, h, nq, nk)`` int: 0 absent, 1 partial, 2 full, read from the block lists."""
    b, h, nq = block_mask.kv_num_blocks.shape
    nk = block_mask.kv_indices.shape[-1]
    out = torch.zeros(b, h, nq, nk, dtype=torch.long)
    lists = [
        (block_mask.kv_num_blocks, block_mask.kv_indices, 1),
        (block_mask.full_kv_num_blocks, block_mask.full_kv_indices, 2),
    ]
    for num, idx, value in lists:
        for bi in range(b):
            for hi in range(h):
                for qi in range(nq):
                    for c in range(int(num[bi, hi, qi])):
                        assert out[bi, hi, qi, idx[bi, hi, qi, c]] == 0, "block listed twice"
                        out[bi, hi, qi, idx[bi, hi, qi, c]] = value
    return out


def check_block_mask(block_mask, n: int, heads: int, block: int) -> None:
    """Every listed block agrees with ``mask_mod`` evaluated on all n x n pairs: a full block is
    all True, a partial block has some True, an absent block is all False."""
    dense = fa.create_mask(
        block_mask.mask_mod, block_mask.kv_num_blocks.shape[0], heads, n, n, device="cpu"
    )
    nb = -(-n // block)
    pad = torch.zeros(*dense.shape[:2], nb * block, nb * block, dtype=torch.bool)
    valid = torch.zeros_like(pad)
    pad[..., :n, :n], valid[..., :n, :n] = dense, True
    tiles = pad.view(*dense.shape[:2], nb, block, nb, block).transpose(3, 4)
    real = valid.view(*dense.shape[:2], nb, block, nb, block).transpose(3, 4)
    pattern = _block_pattern(block_mask).expand(dense.shape[0], heads, nb, nb)
    any_true, all_true = tiles.any((-1, -2)), (tiles | ~real).all((-1, -2))
    assert not (any_true & (pattern == 0)).any(), (
        "mask_mod keeps a pair in a block that is not listed"
    )
    assert all_true[pattern == 2].all(), "a full block holds a pair that mask_mod removes"


def test_window_block_mask_to_dense_and_full_blocks():
    n, w, block = 200, 40, 16
    mask = window_block_mask(n, w, block, "cpu")
    partial, full = window_block_tables(n, w, block, "cpu")
    assert torch.equal(mask.to_dense()[0, 0].bool(), partial | full)
    assert full.sum() > 0 and partial.sum() > 0
    check_block_mask(mask, n, 1, block)


def test_selection_block_mask_to_dense_and_full_blocks():
    n, block, heads = 100, 16, 4
    q, k, _, _ = (x.detach() for x in _inputs(n, heads, 2))
    sel = select_blocks(q, k, 32, block)
    mask = selection_block_mask(sel, n, block, heads)
    nb = 7
    expected = torch.eye(nb, dtype=torch.bool).repeat(2, 2, 1, 1)
    for b in range(2):
        for h in range(2):
            for i in range(nb):
                for c in range(int(sel.counts[b, h, i])):
                    expected[b, h, i, sel.indices[b, h, i, c]] = True
    assert torch.equal(mask.to_dense().bool(), expected.repeat_interleave(2, dim=1))
    pattern = _block_pattern(mask)
    assert (pattern.diagonal(dim1=-2, dim2=-1) == 1).all()  # diagonal: the only partial block
    assert ((pattern == 2).sum(-1) == sel.counts.repeat_interleave(2, dim=1)).all()
    check_block_mask(mask, n, heads, block)


def test_negative_control_mask_mod_disagreeing_with_indices_is_caught():
    n, block = 64, 16
    good = window_block_mask(n, 20, block, "cpu")
    bad = fa.BlockMask.from_kv_blocks(
        good.kv_num_blocks,
        good.kv_indices,
        good.full_kv_num_blocks,
        good.full_kv_indices,
        BLOCK_SIZE=block,
        mask_mod=lambda b, h, q, kv: kv <= q,
        seq_lengths=(n, n),
    )
    with pytest.raises(AssertionError, match="not listed"):
        check_block_mask(bad, n, 1, block)


def test_negative_control_future_block_listed_as_full_is_caught():
    n, block, heads = 64, 16, 2
    q, k, _, _ = (x.detach() for x in _inputs(n, heads, 2))
    sel = select_blocks(q, k, 16, block)
    idx = sel.indices.clone()
    idx[:, :, 1, 0] = 3  # block 1 "selects" the future block 3
    mask = selection_block_mask(BlockSelection(idx, sel.counts), n, block, heads)
    with pytest.raises(AssertionError, match="full block"):
        check_block_mask(mask, n, heads, block)


# ---------------------------------------------------------------------- compiled CPU flex (slowish)


@pytest.fixture(scope="module")
def compiled_cpu_core():
    """The whole core compiled once on CPU (``fullgraph=True``; the CPU flex template needs
    ``epilogue_fusion=False``)."""
    import torch._inductor.config as inductor_config

    from mla.flex_attention import compiled_core

    with inductor_config.patch(epilogue_fusion=False):
        yield compiled_core(None)


def test_compiled_cpu_core_equals_eager_and_reference_and_never_recompiles(compiled_cpu_core):
    import torch._dynamo

    n, block, w, global_k = 200, 32, 40, 40
    wmask = window_block_mask(n, w, block, "cpu")
    for seed in (0, 1):  # the second call has new values: it must reuse the graph
        q, k, v, gate = (x.detach().float() for x in _inputs(n, 4, 2, seed=seed))
        with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=seed == 1):
            compiled = compiled_cpu_core(q, k, v, gate, wmask, top_k=global_k, block=block)
        eager = mla_core(q, k, v, gate, wmask, top_k=global_k, block=block)
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
        sel = select_blocks(q, k, global_k, block)
        ref = block_selection_reference_attention(
            *(x.double() for x in (q, k, v, gate)), window=w, selection=sel, block=block
        )
        torch.testing.assert_close(compiled.double(), ref, rtol=1e-5, atol=1e-5)


def test_negative_control_compiled_flex_reads_indices_that_eager_ignores(compiled_cpu_core):
    """Compiled flex honours the block lists, eager only mask_mod: a BlockMask that lists only
    the diagonal while its mask_mod is plain causal gives different outputs (recipe 2's target)."""
    import torch._inductor.config as inductor_config

    n, block = 128, 32
    q, k, v, _ = (x.detach().float() for x in _inputs(n, 2, 2))
    nb = n // block
    diag = torch.arange(nb, dtype=torch.int32).view(1, 1, nb, 1).expand(1, 1, nb, nb).contiguous()
    bad = fa.BlockMask.from_kv_blocks(
        torch.ones(1, 1, nb, dtype=torch.int32),
        diag,
        BLOCK_SIZE=block,
        mask_mod=lambda b, h, q, kv: kv <= q,
        seq_lengths=(n, n),
    )
    with torch.no_grad(), inductor_config.patch(epilogue_fusion=False):
        compiled = torch.compile(fa.flex_attention, fullgraph=True, dynamic=False)(
            q, k, v, block_mask=bad
        )
    eager = fa.flex_attention(q, k, v, block_mask=bad)
    assert (compiled - eager).abs().max() > 1e-2


def test_backend_choice_on_cpu(monkeypatch):
    from mla.flex_attention import CPU_FORWARD_ENV, flex_backend

    q = torch.zeros(1, 2, 64, 8)
    assert flex_backend(q, 64) == "blocked"  # CPU flex forward is opt-in
    monkeypatch.setenv(CPU_FORWARD_ENV, "1")
    assert flex_backend(q, 64) == "flex"
    assert (
        flex_backend(q, 64, q.clone().requires_grad_()) == "blocked"
    )  # training: CPU flex has no backward
    with torch.no_grad():
        assert flex_backend(q, 64, q.clone().requires_grad_()) == "flex"
    assert flex_backend(q.double(), 64) == "blocked"
