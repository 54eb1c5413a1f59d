"""Sampling (temperature, top-k, top-p, seed) and the generate loop on the KV cache."""

import pytest
import torch

from mla.config import ModelConfig
from mla.generate import check_prompts, generate
from mla.model import MLATransformer
from mla.sampling import SamplingConfig, filter_logits, sample_next
from mla.tokenizer import StreamDecoder, decode, encode

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return MLATransformer(
        ModelConfig(
            d_model=32,
            n_layers=2,
            n_heads=4,
            ffn_hidden=64,
            max_seq_len=48,
            local_window=6,
            global_k=8,
            block_size=4,
        )
    ).eval()


def test_top_k_keeps_the_k_largest_and_top_p_the_smallest_nucleus():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    assert torch.isfinite(filter_logits(logits, 2, 1.0)).tolist() == [
        [True, True, False, False, False]
    ]
    p = logits.softmax(-1)[0]  # 0.636, 0.234, 0.086, ...
    keep = torch.isfinite(filter_logits(logits, None, float(p[0] + p[1]) - 1e-4))
    assert keep.tolist() == [[True, True, False, False, False]]
    assert (
        torch.isfinite(filter_logits(logits, None, 0.01)).sum() == 1
    )  # the most likely always stays


@pytest.mark.parametrize(
    "kw, field",
    [
        (dict(temperature=-0.1), "--temperature"),
        (dict(top_p=0.0), "--top-p"),
        (dict(top_p=1.5), "--top-p"),
        (dict(top_k=0), "--top-k"),
    ],
)
def test_bad_sampling_settings_are_refused_naming_the_option(kw, field):
    with pytest.raises(ValueError, match=field):
        SamplingConfig(**kw)


def test_temperature_zero_is_greedy_and_equals_argmax_of_full_forward(model):
    prompt = encode("def f(x):")
    out = generate(model, [prompt], 20, SamplingConfig(temperature=0))[0]
    seq = list(prompt)
    for _ in range(20):
        seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    assert out == seq[len(prompt) :]


def test_same_seed_same_tokens_other_seed_other_tokens(model):
    prompts = [encode("import os\n"), encode("x = ")]
    cfg = SamplingConfig(temperature=1.0, top_k=50, top_p=0.95, seed=7)
    a = generate(model, prompts, 30, cfg)
    assert a == generate(model, prompts, 30, cfg)
    assert a != generate(
        model, prompts, 30, SamplingConfig(temperature=1.0, top_k=50, top_p=0.95, seed=8)
    )


def test_sampling_follows_the_distribution():
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1]])).expand(4000, 3)
    g = torch.Generator().manual_seed(0)
    counts = (
        torch.bincount(sample_next(logits, SamplingConfig(temperature=1.0), g), minlength=3) / 4000
    )
    assert torch.allclose(counts, torch.tensor([0.7, 0.2, 0.1]), atol=0.03)


def test_rows_stop_at_max_seq_len_and_others_go_on(model):
    out = generate(model, [[1] * 45, [2] * 3], 10, SamplingConfig(temperature=0))
    assert [len(o) for o in out] == [
        4,
        10,
    ]  # 48 - 45 + 1 tokens: the last needs no position of its own


def test_streamed_tokens_are_the_returned_tokens(model):
    seen = [[], []]

    def on_tokens(step, tokens):
        for i, t in enumerate(tokens):
            if t is not None:
                seen[i].append(t)

    out = generate(
        model, [encode("a"), encode("bcd")], 12, SamplingConfig(seed=1), on_tokens=on_tokens
    )
    assert seen == out


@pytest.mark.parametrize(
    "prompts, message",
    [
        ([], "no prompt"),
        ([[]], "prompt 1 is empty"),
        ([[1], [0] * 49], "prompt 2 has 49 tokens, more than"),
    ],
)
def test_bad_prompts_are_refused(prompts, message):
    with pytest.raises(ValueError, match=message):
        check_prompts(prompts, 5, 48)


def test_byte_tokenizer_round_trips_and_streams_multibyte_characters():
    text = "é = 'ü' # → ok"
    assert decode(encode(text)) == text
    d = StreamDecoder()
    assert "".join(d.feed([t]) for t in encode(text)) + d.flush() == text
