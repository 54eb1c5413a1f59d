"""Multi-level attention: the efficient paths against the dense n x n reference (fp64)."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mla.attention import MultiLevelAttention, multi_level_attention
from mla.config import ModelConfig
from mla.global_attention import global_topk_attention
from mla.local_attention import DISABLE_FLEX_ENV, blocked_local_attention, local_backend
from mla.reference import (
    block_selection_reference_attention,
    dense_reference_attention,
    reference_select_blocks,
)
from mla.rope import apply_rope, rope_cache

# (seq, window, top_k, block, kv_heads): n not a multiple of B, w >= n, k >= n, GQA, tiny n.
CASES = [
    (37, 5, 4, 8, 3),
    (37, 50, 40, 8, 1),
    (64, 16, 8, 16, 3),
    (70, 9, 20, 16, 1),
    (23, 23, 3, 4, 3),
    (1, 1, 1, 1, 3),
]
MODES = [("exact", True), ("exact", False), ("block", True), ("block", False)]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _inputs(n, kv, heads=3, d=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(2, heads, n, d, dtype=torch.float64, generator=gen)
    k = torch.randn(2, kv, n, d, dtype=torch.float64, generator=gen)
    v = torch.randn(2, kv, n, d, dtype=torch.float64, generator=gen)
    gate = torch.rand(2, heads, n, dtype=torch.float64, generator=gen)
    return [t.requires_grad_() for t in (q, k, v, gate)]


def _grads(out, inputs):
    weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype, device=out.device).view_as(out)
    return torch.autograd.grad((out * weights).sum(), inputs, allow_unused=True)


def _reference(q, k, v, gate, window, top_k, indexer, block):
    """Dense masked reference: exact top-k, or the brute-force block selection's token mask."""
    if indexer == "exact":
        return dense_reference_attention(q, k, v, gate, window=window, top_k=top_k)
    sel = reference_select_blocks(q, k, top_k, block)
    return block_selection_reference_attention(
        q, k, v, gate, window=window, selection=sel, block=block
    )


@pytest.mark.parametrize("indexer,gated", MODES)
@pytest.mark.parametrize("n,w,k,b,kv", CASES)
def test_efficient_path_matches_dense_reference(n, w, k, b, kv, indexer, gated):
    q, key, v, gate = _inputs(n, kv)
    g = gate if gated else None
    out = multi_level_attention(q, key, v, g, window=w, top_k=k, indexer=indexer, block=b)
    ref = _reference(q, key, v, g, w, k, indexer, b)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    wrt = (q, key, v, gate) if gated else (q, key, v)
    for got, want in zip(_grads(out, wrt), _grads(ref, wrt), strict=False):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("indexer", ["exact", "block"])
def test_chunked_block_paths_match_dense_reference(indexer, monkeypatch):
    monkeypatch.setattr("mla.tensor_ops.CHUNK_ELEMENTS", 3000)  # 1-3 query blocks per chunk
    q, key, v, gate = _inputs(70, 1)
    out = multi_level_attention(q, key, v, gate, window=9, top_k=5, indexer=indexer, block=8)
    ref = _reference(q, key, v, gate, 9, 5, indexer, 8)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    for got, want in zip(
        _grads(out, (q, key, v, gate)), _grads(ref, (q, key, v, gate)), strict=False
    ):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_block_chunks_cover_every_block_once():
    from mla.tensor_ops import block_chunks

    assert block_chunks(10, 3, budget=9) == [(0, 3), (3, 6), (6, 9), (9, 10)]
    assert block_chunks(4, 100, budget=9) == [(0, 1), (1, 2), (2, 3), (3, 4)]


@pytest.mark.parametrize("indexer,gated", MODES)
def test_no_output_depends_on_a_future_token(indexer, gated):
    n, t = 45, 29
    q, k, v, gate = (x.detach() for x in _inputs(n, 3))
    g = gate if gated else None

    def run(q, k, v, g):
        return multi_level_attention(q, k, v, g, window=6, top_k=5, indexer=indexer, block=8)

    base = run(q, k, v, g)
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    for x in (q2, k2, v2):
        x[:, :, t:] += torch.randn_like(x[:, :, t:]) * 3
    g2 = None if g is None else torch.cat([g[..., :t], torch.rand_like(g[..., t:])], dim=-1)
    moved = run(q2, k2, v2, g2)
    assert torch.equal(moved[:, :, :t], base[:, :, :t])
    assert not torch.allclose(moved[:, :, t], base[:, :, t])


def test_block_selection_sees_every_causal_key_when_all_blocks_fit():
    q, k, v, _ = _inputs(24, 3)  # nb = 3 blocks of 8; global_k 16 -> 2 earlier blocks: all fit
    exact = global_topk_attention(q, k, v, 24, "exact", 8)  # k = n: plain causal attention
    block = global_topk_attention(q, k, v, 16, "block", 8)
    torch.testing.assert_close(block, exact, rtol=1e-12, atol=1e-12)


def test_block_selection_is_not_plain_causal_attention_when_blocks_are_dropped():
    q, k, v, _ = _inputs(96, 3)
    exact = global_topk_attention(q, k, v, 96, "exact", 8)
    block = global_topk_attention(q, k, v, 8, "block", 8)
    torch.testing.assert_close(block[:, :, :16], exact[:, :, :16], rtol=1e-12, atol=1e-12)
    assert not torch.allclose(block[:, :, 16:], exact[:, :, 16:])


class _LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an op produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("indexer", ["block"])
def test_sparse_paths_never_materialise_n_by_n(indexer):
    n, heads, d = 1024, 2, 8
    q, k, v = (torch.randn(1, heads, n, d, requires_grad=True) for _ in range(3))
    gate = torch.rand(1, heads, n, requires_grad=True)
    with _LargestTensor() as probe:
        out = multi_level_attention(q, k, v, gate, window=16, top_k=8, indexer=indexer, block=16)
        out.sum().backward()
    assert probe.largest < heads * n * n / 8, probe.largest


def test_local_branch_alone_matches_band_reference():
    q, k, v, _ = _inputs(33, 3)
    out = blocked_local_attention(q, k, v, window=7, block=4)
    band = dense_reference_attention(
        q, k, v, torch.ones(q.shape[:3], dtype=q.dtype), window=7, top_k=1
    )
    torch.testing.assert_close(out, band, rtol=1e-12, atol=1e-12)


def test_cpu_and_fp64_select_the_blocked_local_path(monkeypatch):
    assert local_backend(torch.zeros(1, 1, 4, 2)) == "blocked"
    monkeypatch.setenv(DISABLE_FLEX_ENV, "1")
    assert local_backend(torch.zeros(1, 1, 4, 2)) == "blocked"


def test_bad_arguments_raise_clear_errors():
    q, k, v, gate = (x.detach() for x in _inputs(8, 3))
    with pytest.raises(ValueError, match="indexer"):
        global_topk_attention(q, k, v, 2, "fuzzy", 4)
    with pytest.raises(ValueError, match="top_k"):
        global_topk_attention(q, k, v, 0, "exact", 4)
    with pytest.raises(ValueError, match="gate"):
        multi_level_attention(q, k, v, gate[..., :4], window=2, top_k=2)


def test_rope_scores_depend_only_on_relative_position():
    cos, sin = rope_cache(64, 8)
    gen = torch.Generator().manual_seed(1)
    q, k = torch.randn(8, generator=gen), torch.randn(8, generator=gen)

    def rows(x):
        return apply_rope(x.expand(1, 1, 64, 8), cos, sin)[0, 0]

    rq, rk = rows(q), rows(k)
    torch.testing.assert_close(rq[10] @ rk[7], rq[40] @ rk[37], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(rq[10] @ rk[7], rq[10] @ rk[3])


def _module(attention="mla", mix="gate", **kw):
    cfg = ModelConfig(
        d_model=24,
        n_heads=3,
        n_kv_heads=kw.pop("kv", None),
        max_seq_len=40,
        attention=attention,
        mix=mix,
        **kw,
    )
    torch.manual_seed(0)
    return MultiLevelAttention(cfg).double()


def test_module_parameters_and_non_persistent_rope_cache():
    names = {n: tuple(p.shape) for n, p in _module(kv=1).named_parameters()}
    assert names == {
        "wq.weight": (24, 24),
        "wk.weight": (8, 24),
        "wv.weight": (8, 24),
        "wo.weight": (24, 24),
        "w_gate.weight": (3, 24),
        "w_gate.bias": (3,),
    }
    assert _module(mix="sum").w_gate is None and _module(attention="dense").w_gate is None
    assert not any("rope" in key for key in _module().state_dict())


@pytest.mark.parametrize("indexer", ["exact", "block"])
def test_mla_with_full_window_and_k_equals_dense_module(indexer):
    dense = _module(attention="dense", kv=1)
    mla = _module(local_window=40, global_k=40, indexer=indexer, block_size=8, kv=1)
    mla.load_state_dict(
        dense.state_dict(), strict=False
    )  # gate stays random: both branches = dense
    x = torch.randn(2, 30, 24, dtype=torch.float64)
    torch.testing.assert_close(mla(x), dense(x), rtol=1e-10, atol=1e-10)


def test_module_rejects_sequences_longer_than_the_rope_cache():
    with pytest.raises(ValueError, match="max_seq_len"):
        _module()(torch.randn(1, 41, 24, dtype=torch.float64))


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@needs_cuda
@pytest.mark.parametrize("n,w", [(1000, 128), (2048, 300)])
def test_flex_local_path_matches_blocked_path_on_cuda(n, w):
    torch.backends.cuda.matmul.allow_tf32 = False
    q, k, v = (torch.randn(2, 4, n, 64, device="cuda", requires_grad=True) for _ in range(3))
    assert local_backend(q) == "flex"
    from mla.local_attention import local_attention

    flex = local_attention(q, k, v, w, 64)
    blocked = blocked_local_attention(q, k, v, w, 64)
    torch.testing.assert_close(flex, blocked, rtol=1e-3, atol=1e-3)
    for got, want in zip(_grads(flex, (q, k, v)), _grads(blocked, (q, k, v)), strict=False):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)


@needs_cuda
@pytest.mark.parametrize("indexer", ["exact", "block"])
def test_cuda_bf16_multi_level_attention_matches_fp64_reference(indexer):
    q, k, v, gate = (x.detach() for x in _inputs(1000, 2, heads=4, d=64))
    cuda = [x.cuda().bfloat16().requires_grad_() for x in (q, k, v, gate)]
    out = multi_level_attention(*cuda, window=128, top_k=16, indexer=indexer, block=64)
    out.float().sum().backward()
    assert all(torch.isfinite(x.grad).all() for x in cuda)
    ref = multi_level_attention(q, k, v, gate, window=128, top_k=16, indexer=indexer, block=64)
    close = torch.isclose(out.double().cpu(), ref, rtol=0.05, atol=0.05).float().mean()
    assert close > 0.99  # bf16 may flip a few near-tied top-k choices, not more
