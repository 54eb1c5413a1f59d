"""Parameter and FLOP counts of mla.flops against hand-computed values."""

import pytest

from mla.config import PRESETS, ModelConfig
from mla.flops import attention_flops_per_token, count_parameters, training_flops_per_token


def test_tiny_parameter_count_by_hand():
    # per layer: 2d + d*H*hd + 2*d*kv*hd + H*hd*d + (d*H + H) + 3*d*ffn
    layer = 256 + 16_384 + 32_768 + 16_384 + 516 + 135_168
    assert count_parameters(PRESETS["tiny"]) == 256 * 128 + 4 * layer + 128 == 838_800


def test_gqa_parameter_count_by_hand():
    # preset 1b: d=2048, L=22, H=32, kv=4 (hd=64), ffn=5632, gated MLA, V=32000
    layer = 4096 + 4_194_304 + 1_048_576 + 4_194_304 + 65_568 + 34_603_008
    assert count_parameters(PRESETS["1b"]) == 22 * layer + 65_536_000 + 2048 == 1_035_954_880


def test_dense_has_no_gate_parameters():
    cfg = ModelConfig(
        vocab_size=1000, d_model=64, n_layers=2, n_heads=4, ffn_hidden=128, attention="dense"
    )
    layer = 128 + 4096 + 8192 + 4096 + 3 * 64 * 128
    assert count_parameters(cfg) == 2 * layer + 64_000 + 64 == 146_240


def test_tiny_training_flops_by_hand():
    # 6N + 12*L*H*hd*(min(w,T) + min((ceil(k/B)+1)*B, T)) + 2*L*Hkv*hd*ceil(T/B)/B
    # = 6*838800 + 12*4*128*(32 + 2*32) + 2*4*4*32*8/32
    assert training_flops_per_token(PRESETS["tiny"], 256) == 5_032_800 + 589_824 + 256


def test_exact_indexer_span_is_k_tokens():
    # 6N + 12*L*H*hd*(min(w,T) + min(k,T)) = 6*838800 + 12*4*128*(32+8)
    exact = PRESETS["tiny"].replace(indexer="exact")
    assert training_flops_per_token(exact, 256) == 5_032_800 + 245_760


def test_mla_span_is_clipped_by_sequence_length():
    # T=16 < w=32 and < 2 blocks of 32: span = 16 + 16, plus the scoring 2*4*4*32*1/32
    assert attention_flops_per_token(PRESETS["tiny"], 16) == 12 * 4 * 128 * 32 + 32
    assert (
        attention_flops_per_token(PRESETS["tiny"].replace(indexer="exact"), 16) == 12 * 4 * 128 * 24
    )


def test_block_selection_span_rounds_k_up_to_whole_blocks_plus_the_diagonal():
    # 1b preset: w=512, k=128, B=128 -> n_sel=1: span 512 + 256 at T=4096; GQA: scoring over 4 kv heads
    cfg = PRESETS["1b"]
    expected = 12 * 22 * 2048 * (512 + 256) + 2 * 22 * 4 * 64 * 32 / 128
    assert attention_flops_per_token(cfg, 4096) == expected


def test_dense_attention_term_is_palm_12LHQT():
    cfg = PRESETS["7b"].replace(attention="dense")
    assert attention_flops_per_token(cfg, 4096) == 12 * 32 * 4096 * 4096


def test_block_selection_adds_pooled_key_scoring():
    block = PRESETS["tiny"]  # block_size 32 -> 256/32 = 8 pooled key blocks per query block
    wide = block.replace(global_k=72)  # ceil(72/32) = 3 blocks + diagonal: span 128, not 64
    assert (
        attention_flops_per_token(wide, 256) - attention_flops_per_token(block, 256)
        == 12 * 4 * 128 * 64
    )
    assert attention_flops_per_token(block, 256) - 12 * 4 * 128 * 96 == 2 * 4 * 4 * 32 * 8 / 32


def test_palm_worked_check_llama3_405b():
    # formulas.md §5 check 5: 12*L*h*s = 12*126*16384*8192 = 0.203e12 FLOP/token
    cfg = ModelConfig(
        vocab_size=128000,
        d_model=16384,
        n_layers=126,
        n_heads=128,
        n_kv_heads=8,
        ffn_hidden=53248,
        max_seq_len=8192,
        attention="dense",
    )
    assert attention_flops_per_token(cfg, 8192) == pytest.approx(0.203e12, rel=2e-3)
    assert count_parameters(cfg) == pytest.approx(405e9, rel=0.01)


def test_bad_seq_len_raises():
    with pytest.raises(ValueError, match="seq_len"):
        training_flops_per_token(PRESETS["tiny"], 0)
