"""TensorBoard event files (``RUN_DIR/tb``) read back with TensorBoard's own reader
(``EventAccumulator``, not tbparse: tbparse ignores ``purge_step``): the expected tags, and after
an attempt that died past its last checkpoint and a resume, no step twice."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

from workers.tensorboard import TB_DIR, RunBoard  # noqa: E402


def read(run_dir: Path) -> EventAccumulator:
    """Every event of ``RUN_DIR/tb`` (no sampling)."""
    acc = EventAccumulator(
        str(run_dir / TB_DIR),
        size_guidance={"scalars": 0, "histograms": 0, "tensors": 0, "images": 0},
    )
    acc.Reload()
    return acc


def _attempt(run_dir: Path, resumed: int, steps: range, attempt: int, close: bool) -> None:
    board = RunBoard(run_dir, resumed)
    board.start(resumed, {"train": {"steps": 40}}, "dp=2 tp=1 pp=1 zero=2 mb=4 ga=2")
    for step in steps:
        record = {
            "loss": 10.0 * attempt + step / 100,
            "lr": 1e-3,
            "tokens_per_s": 100.0,
            "mfu": float("nan"),
        }
        if step % 10 == 0:
            record["val_loss"] = 5.0 * attempt
            board.gates(step, {0: [0.4, 0.6], 1: [0.5, 0.5]})
        board.scalars(step, record)
    board.flush()
    if close:
        board.close()


def test_tags_and_no_duplicate_steps_after_a_resume(tmp_path):
    # attempt 1 logs to step 30 but its last checkpoint is step 20; attempt 2 resumes from 20
    _attempt(tmp_path, 0, range(5, 31, 5), attempt=1, close=False)
    _attempt(tmp_path, 20, range(25, 41, 5), attempt=2, close=True)
    acc = read(tmp_path)
    tags = acc.Tags()
    assert {"train/loss", "train/lr", "perf/tokens_per_s", "val/loss"} <= set(tags["scalars"])
    assert "perf/mfu" not in tags["scalars"]  # a nan is not written
    assert {"attention/gate_mean/layer_0", "attention/gate_mean/layer_1"} <= set(tags["scalars"])
    assert {"attention/gate/layer_0", "attention/gate/layer_1"} <= set(tags["histograms"])
    loss = acc.Scalars("train/loss")
    assert [e.step for e in loss] == [5, 10, 15, 20, 25, 30, 35, 40]
    # steps up to the checkpoint come from attempt 1, the later ones from attempt 2 only
    assert [round(e.value) for e in loss] == [10, 10, 10, 10, 20, 20, 20, 20]
    assert [e.step for e in acc.Scalars("val/loss")] == [10, 20, 30, 40]
    assert acc.Scalars("attention/gate_mean/layer_0")[0].value == pytest.approx(0.5)


def test_attention_maps_are_images_that_decode(tmp_path):
    import io

    import torch
    from matplotlib.image import imread

    from mla.attention_map import effective_attention
    from mla.config import ModelConfig
    from mla.model import MLATransformer

    cfg = ModelConfig(
        vocab_size=64,
        d_model=32,
        n_layers=2,
        n_heads=2,
        ffn_hidden=64,
        local_window=4,
        global_k=4,
        block_size=4,
    )
    amap = effective_attention(MLATransformer(cfg).eval(), torch.randint(0, 64, (16,)), layer=1)
    board = RunBoard(tmp_path, 0)
    board.attention(10, {1: amap})
    board.close()
    (event,) = read(tmp_path).Images("attention/map/layer_1_head_0")
    pixels = imread(io.BytesIO(event.encoded_image_string), format="png")
    assert event.step == 10 and pixels.shape[:2] == (16, 16)
    expected = (amap.weights[0] / amap.weights[0].max()).numpy()
    gray = pixels[..., 0] if pixels.ndim == 3 else pixels
    assert abs(gray - expected).max() <= 1 / 255 + 1e-6  # 8-bit grey of weights / max


def test_config_and_layout_are_text(tmp_path):
    _attempt(tmp_path, 0, range(5, 11, 5), attempt=1, close=True)
    acc = read(tmp_path)
    assert {"run/config/text_summary", "run/layout/text_summary"} <= set(acc.Tags()["tensors"])
    layout = acc.Tensors("run/layout/text_summary")[0].tensor_proto.string_val[0].decode()
    assert layout == "dp=2 tp=1 pp=1 zero=2 mb=4 ga=2"
