"""Incremental decoding (prefill + token by token) reproduces one full forward pass: MLA with
block selection and with the exact indexer, and dense; rows of different lengths; rolling buffer."""

import pytest
import torch

from mla.config import ModelConfig
from mla.decoding import decode_step, logits_at_last, prefill
from mla.kv_cache import MLACache, StepPositions
from mla.model import MLATransformer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

RTOL = 1e-5


def small_model(seed=0, **kw) -> MLATransformer:
    base = dict(d_model=32, n_layers=2, n_heads=4, ffn_hidden=64, max_seq_len=96)
    torch.manual_seed(seed)
    return MLATransformer(ModelConfig(**{**base, **kw})).eval()


def incremental_logits(model, tokens, prompt_len):
    """Logits for positions prompt_len-1 .. n-2 from prefill + decode of the given tokens."""
    state, logits = prefill(model, tokens[:, :prompt_len])
    out = [logits_at_last(logits, state)]
    for t in range(prompt_len, tokens.shape[1] - 1):
        out.append(decode_step(model, tokens[:, t], state))
    return torch.stack(out, dim=1)


def assert_close_rel(actual, expected, rtol=RTOL):
    err = (actual - expected).abs().max() / expected.abs().max()
    assert err <= rtol, f"max error {err:.2e} relative to the largest logit exceeds {rtol:.0e}"


@pytest.mark.parametrize(
    "window, global_k, block, kv_heads, prompt_len",
    [
        (8, 5, 4, None, 7),  # 2 selected blocks, prompt not a multiple of the block
        (3, 1, 4, 2, 1),  # GQA, one-token prompt, window smaller than the block
        (20, 12, 8, 1, 13),  # one kv head for all query heads, window > block
        (16, 40, 5, None, 22),  # odd block size, many selected blocks
        (200, 8, 4, 2, 3),  # window longer than the sequence
    ],
)
def test_mla_block_selection_decoding_matches_full_forward(
    window, global_k, block, kv_heads, prompt_len
):
    model = small_model(
        attention="mla",
        indexer="block",
        local_window=window,
        global_k=global_k,
        block_size=block,
        n_kv_heads=kv_heads,
    )
    tokens = torch.randint(0, 256, (2, 90), generator=torch.Generator().manual_seed(1))
    full = model(tokens)[:, prompt_len - 1 : -1]
    assert_close_rel(incremental_logits(model, tokens, prompt_len), full)


@pytest.mark.parametrize(
    "kw",
    [
        dict(attention="dense"),
        dict(attention="dense", n_kv_heads=2),
        dict(attention="mla", indexer="exact", local_window=6, global_k=5, block_size=4),
        dict(attention="mla", indexer="block", mix="sum", local_window=6, global_k=9, block_size=4),
        dict(attention="mla", mix="local", local_window=6, global_k=9, block_size=4),
    ],
)
def test_dense_exact_and_sum_mix_decoding_matches_full_forward(kw):
    model = small_model(**kw)
    tokens = torch.randint(0, 256, (1, 60), generator=torch.Generator().manual_seed(2))
    assert_close_rel(incremental_logits(model, tokens, 11), model(tokens)[:, 10:-1])


def test_selection_changes_across_blocks_so_the_test_is_not_vacuous():
    """The decoded selection differs between query blocks and some earlier blocks are left out."""
    model = small_model(attention="mla", local_window=4, global_k=4, block_size=4)
    tokens = torch.randint(0, 256, (1, 80), generator=torch.Generator().manual_seed(3))
    state, _ = prefill(model, tokens[:, :5])
    seen = set()
    for t in range(5, 79):
        decode_step(model, tokens[:, t], state)
        seen.add(tuple(state.caches[0].sel[0, :, 0].tolist()))
    assert len(seen) > 3


@pytest.mark.parametrize("attention", ["mla", "dense"])
def test_batched_rows_of_different_lengths_equal_per_row_decoding(attention):
    model = small_model(attention=attention, local_window=6, global_k=8, block_size=4, n_kv_heads=2)
    g = torch.Generator().manual_seed(4)
    lengths, steps = [9, 3, 14], 25
    seqs = [torch.randint(0, 256, (n + steps,), generator=g) for n in lengths]
    padded = torch.zeros(3, max(lengths), dtype=torch.long)
    for i, (s, n) in enumerate(zip(seqs, lengths, strict=False)):
        padded[i, :n] = s[:n]
    state, logits = prefill(model, padded, lengths)
    batched = [logits_at_last(logits, state)]
    for t in range(steps - 1):
        batched.append(
            decode_step(
                model, torch.stack([s[n + t] for s, n in zip(seqs, lengths, strict=False)]), state
            )
        )
    batched = torch.stack(batched, dim=1)
    for i, (s, n) in enumerate(zip(seqs, lengths, strict=False)):
        alone = incremental_logits(model, s.view(1, -1), n)
        assert_close_rel(batched[i : i + 1], alone)


def test_rolling_buffer_holds_exactly_the_window_and_never_more_than_w():
    w = 5
    model = small_model(attention="mla", local_window=w, global_k=4, block_size=4)
    tokens = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(5))
    state, _ = prefill(model, tokens[:, :3], lengths=[3, 2])
    for t in range(30):
        decode_step(model, tokens[:, 3 + t], state)
        for cache in state.caches:
            assert cache.local_k.shape[2] == w
            assert int(cache.local_entries().max()) <= w
            for row, n in enumerate(state.lengths):
                held = sorted(p for p in cache.local_pos[row].tolist() if p >= 0)
                assert held == list(range(max(0, n - w), n))
                slots = torch.tensor(held) % w
                assert torch.equal(cache.local_k[row, :, slots], cache.k[row, :, held])


def test_cache_refuses_positions_past_its_capacity():
    model = small_model(attention="mla", local_window=4, global_k=4, block_size=4, max_seq_len=16)
    state, _ = prefill(model, torch.zeros(1, 16, dtype=torch.long))
    with pytest.raises(ValueError, match="capacity 16"):
        decode_step(model, torch.zeros(1, dtype=torch.long), state)


def test_mla_cache_rejects_a_position_outside_the_batch_shape():
    cache = MLACache(1, 4, 4, 8, 32, window=4, top_k=4, block=4)
    q, k = torch.zeros(1, 4, 1, 8), torch.zeros(1, 4, 1, 8)
    with pytest.raises(ValueError, match="within the cache capacity"):
        cache.attend(q, k, k, None, StepPositions.of([32], "cpu"))
