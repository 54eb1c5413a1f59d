"""Planner memory model: ZeRO paper numbers, DeepSpeed estimators, Korthikanti activations."""

import pytest
from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

from mla.config import PRESETS, ModelConfig
from orchestrator.contract.layout import Layout
from orchestrator.planner.memory import (
    activation_bytes_per_layer,
    buffer_bytes,
    layers_on_stage,
    mla_attention_bytes,
    model_state_bytes,
    stage_parameters,
    zero_paper_bytes,
)

GPT3 = ModelConfig(
    vocab_size=51200,
    d_model=12288,
    n_layers=96,
    n_heads=96,
    ffn_hidden=32768,
    max_seq_len=2048,
    attention="dense",
    dropout=0.1,
)


@pytest.mark.parametrize("stage,gb", [(0, 120.0), (1, 31.4), (2, 16.6), (3, 1.9)])
def test_zero_paper_figure1(stage, gb):
    assert zero_paper_bytes(7.5e9, stage, 64) / 1e9 == pytest.approx(gb, abs=0.05)


@pytest.mark.parametrize("psi,gpus_per_node,nodes", [(7.5e9, 8, 8), (1.3e9, 4, 1), (70e9, 8, 16)])
def test_zero2_matches_deepspeed_estimator(psi, gpus_per_node, nodes):
    _, ds_gpu = estimate_zero2_model_states_mem_needs(
        int(psi), gpus_per_node, nodes, cpu_offload=False
    )
    ours = sum(model_state_bytes(int(psi), 2, gpus_per_node * nodes, "bf16"))
    assert ours == pytest.approx(ds_gpu, abs=1)


@pytest.mark.parametrize("psi,largest", [(7.5e9, 206e6), (1e9, 65e6)])
def test_zero3_matches_deepspeed_estimator(psi, largest):
    _, ds_gpu, ds_largest = estimate_zero3_model_states_mem_needs(
        int(psi), int(largest), 8, 8, cpu_offload=False
    )
    ours = sum(model_state_bytes(int(psi), 3, 64, "bf16"))
    assert ours + ds_largest == pytest.approx(ds_gpu, abs=1)


def test_zero3_buffers_include_deepspeed_largest_layer():
    cfg = ModelConfig(vocab_size=50000, d_model=4096, n_layers=2, n_heads=32, ffn_hidden=11008)
    with_3 = buffer_bytes(cfg, 1e6, Layout(dp=8, zero_stage=3), "bf16")
    with_2 = buffer_bytes(cfg, 1e6, Layout(dp=8, zero_stage=2), "bf16")
    assert with_3 - with_2 == 4 * 50000 * 4096


def test_megatron_distributed_optimizer_fp16_table():
    # Megatron README: fp16 params/grads, non-distributed 20 B/param, distributed 4 + 16/d
    assert sum(model_state_bytes(1.0, 0, 8, "fp16")) == 20
    assert sum(model_state_bytes(1.0, 1, 8, "fp16")) == pytest.approx(4 + 16 / 8)


@pytest.mark.parametrize(
    "kwargs,gb",
    [
        (dict(tp=1), 2.87),
        (dict(tp=8), 0.58),
        (dict(tp=8, sequence_parallel=True), 0.36),
        (dict(tp=8, sequence_parallel=True, recompute="selective"), 0.107),
        (dict(tp=8, recompute="full"), 0.050),
    ],
)
def test_korthikanti_gpt3_worked_check(kwargs, gb):
    got = activation_bytes_per_layer(GPT3, 2048, 1, flash=False, **kwargs)
    assert got / 1e9 == pytest.approx(gb, rel=0.02)


def test_flash_attention_drops_score_storage():
    flash = activation_bytes_per_layer(GPT3, 2048, 1, 8, flash=True)
    assert flash == pytest.approx(2048 * 12288 * (10 + 24 / 8))


def test_gqa_shrinks_key_value_activations():
    mha = activation_bytes_per_layer(GPT3, 2048, 1, 1)
    gqa = activation_bytes_per_layer(GPT3.replace(n_kv_heads=8), 2048, 1, 1)
    assert mha - gqa == pytest.approx(2048 * 12288 * 4 * (1 - 8 / 96))


def test_mla_attention_term_tiny_by_hand():
    global_branch = 524_288 * 2 + 2_097_152 + 1_048_576 + 8_192
    local_branch = 524_288 * 2 + 2_097_152 + 1_048_576
    assert mla_attention_bytes(PRESETS["tiny"], 256, 8) == global_branch + local_branch + 2 * 16_384
    assert mla_attention_bytes(PRESETS["tiny"], 256, 8, "selective") == 2 * 8 * 256 * 4
    flex = PRESETS["tiny"].replace(block_size=128)
    assert mla_attention_bytes(flex, 256, 8) == 8 * 8 * 4 * 256 + 4 * 8 * 4 * 256 * 32 + 2 * 16_384


@pytest.mark.parametrize(
    "b, heads, kv, n, hd, window, top_k, block",
    [
        (2, 4, 2, 256, 32, 32, 8, 64),  # GQA, one selected block
        (1, 4, 4, 512, 16, 48, 100, 32),  # four selected blocks, two window blocks
        (1, 2, 1, 200, 16, 20, 40, 32),  # a sequence that pads to whole blocks
    ],
)
def test_mla_attention_term_is_what_autograd_saves(b, heads, kv, n, hd, window, top_k, block):
    """Measured: the bytes of every tensor autograd saves in the blocked MLA core (bf16, CPU),
    beyond its inputs, equal the formula without the gate's sigmoid output (an input here)."""
    import torch

    from mla.attention import multi_level_attention

    g = torch.Generator().manual_seed(0)
    q = torch.randn(b, heads, n, hd, generator=g, dtype=torch.bfloat16, requires_grad=True)
    k, v = (
        torch.randn(b, kv, n, hd, generator=g, dtype=torch.bfloat16, requires_grad=True)
        for _ in range(2)
    )
    gate = torch.rand(b, heads, n, generator=g, dtype=torch.bfloat16).requires_grad_()
    inputs = {t.untyped_storage().data_ptr() for t in (q, k, v, gate)}
    saved: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in inputs:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        multi_level_attention(q, k, v, gate, window=window, top_k=top_k, block=block)
    cfg = PRESETS["tiny"].replace(
        n_heads=heads,
        n_kv_heads=kv,
        d_model=heads * hd,
        local_window=window,
        global_k=top_k,
        block_size=block,
    )
    predicted = mla_attention_bytes(cfg, n, b, backend="blocked") - 2 * b * n * heads
    assert predicted == sum(saved.values())


def test_uneven_pipeline_split_puts_extra_layers_first():
    assert [layers_on_stage(126, 16, s) for s in (0, 13, 14, 15)] == [8, 8, 7, 7]
    assert sum(layers_on_stage(126, 16, s) for s in range(16)) == 126


def test_embedding_and_head_sit_on_first_and_last_stage():
    cfg = PRESETS["7b"]
    first, middle, last = (stage_parameters(cfg, 1, 4, s) for s in (0, 1, 3))
    assert first - middle == cfg.vocab_size * cfg.d_model
    assert last - middle == cfg.vocab_size * cfg.d_model + cfg.d_model


@pytest.mark.parametrize(
    "stage,dp,per_param", [(0, 8, 18.0), (1, 8, 6 + 12 / 8), (1, 64, 6 + 12 / 64)]
)
def test_megatron_bf16_fp32_main_grads_match_the_readme_table(stage, dp, per_param):
    # Megatron-LM README "Distributed Optimizer", bf16 param / fp32 grads row: 18 and 6 + 12/d
    assert sum(model_state_bytes(1.0, stage, dp, "bf16", fp32_main_grads=True)) == pytest.approx(
        per_param
    )
    # fp16 rows are unchanged (20 and 4 + 16/d): the flag concerns bf16 only
    assert sum(model_state_bytes(1.0, stage, dp, "fp16", fp32_main_grads=True)) == pytest.approx(
        sum(model_state_bytes(1.0, stage, dp, "fp16"))
    )
