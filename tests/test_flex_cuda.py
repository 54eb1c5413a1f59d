"""CUDA checks of the FlexAttention path in bf16 against an fp32 dense reference (GPU only).

Run by ``benchmarks/gpu_check.sh``; skipped without a CUDA device. The bf16 path and the fp32
reference use the *same* selection (:func:`mla.block_selection.select_blocks` pools in float32
whatever the input dtype, so bf16 inputs and their fp32 copies select identical blocks), so the
comparison isolates the kernels' numerics. Bound: relative RMS error <= 1e-2
(GPU-DESIGN.md §4.4).
"""

from __future__ import annotations

import pytest
import torch

from mla.attention import multi_level_attention
from mla.block_selection import select_blocks
from mla.flex_attention import flex_backend
from mla.reference import block_selection_reference_attention

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

REL_RMS = 1e-2


def _rel_rms(got: torch.Tensor, want: torch.Tensor) -> float:
    return float(
        (got.float() - want.float()).pow(2).mean().sqrt() / want.float().pow(2).mean().sqrt()
    )


def _inputs(n, heads, kv, d, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(1, heads, n, d, device="cuda", generator=gen)
    k = torch.randn(1, kv, n, d, device="cuda", generator=gen)
    v = torch.randn(1, kv, n, d, device="cuda", generator=gen)
    gate = torch.rand(1, heads, n, device="cuda", generator=gen)
    return [t.bfloat16() for t in (q, k, v, gate)]


@pytest.mark.parametrize(
    "n,heads,kv,d,w,global_k",
    [(2048, 4, 4, 64, 128, 16), (1000, 16, 4, 128, 300, 256), (4096, 8, 2, 64, 64, 512)],
)
def test_flex_bf16_matches_fp32_reference_with_gradients(n, heads, kv, d, w, global_k):
    bf = [t.requires_grad_() for t in _inputs(n, heads, kv, d)]
    assert flex_backend(bf[0], 128) == "flex"
    out = multi_level_attention(*bf, window=w, top_k=global_k, indexer="block", block=128)
    fp = [t.detach().float().requires_grad_() for t in bf]
    sel = select_blocks(fp[0], fp[1], global_k, 128)
    assert torch.equal(sel.indices, select_blocks(bf[0], bf[1], global_k, 128).indices)
    ref = block_selection_reference_attention(*fp, window=w, selection=sel, block=128)
    assert _rel_rms(out, ref) < REL_RMS
    dout = torch.randn_like(ref)
    got = torch.autograd.grad(out, bf, dout.bfloat16())
    want = torch.autograd.grad(ref, fp, dout)
    for name, g, r in zip("q k v gate".split(), got, want, strict=False):
        assert torch.isfinite(g).all(), name
        assert _rel_rms(g, r) < REL_RMS, (name, _rel_rms(g, r))


def test_flex_path_does_not_recompile_across_steps_at_a_fixed_shape():
    import torch._dynamo

    bf = [t.requires_grad_() for t in _inputs(2048, 4, 4, 64)]
    multi_level_attention(*bf, window=128, top_k=16, indexer="block", block=128).sum().backward()
    with torch._dynamo.config.patch(error_on_recompile=True):
        for seed in (1, 2):
            x = [t.requires_grad_() for t in _inputs(2048, 4, 4, 64, seed=seed)]
            multi_level_attention(
                *x, window=128, top_k=16, indexer="block", block=128
            ).sum().backward()


def test_negative_control_off_by_one_window_fails_the_bound():
    bf = _inputs(2048, 4, 4, 64)
    out = multi_level_attention(*bf, window=2, top_k=16, indexer="block", block=128)
    fp = [t.float() for t in bf]
    sel = select_blocks(fp[0], fp[1], 16, 128)
    ref = block_selection_reference_attention(*fp, window=1, selection=sel, block=128)
    assert _rel_rms(out, ref) > REL_RMS
