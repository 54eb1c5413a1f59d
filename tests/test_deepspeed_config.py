"""The generated DeepSpeed config must not drift: one golden JSON per layout family.

Regenerate after an intended change with
``MLA_UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/test_deepspeed_config.py`` and review
the diff.
"""

import json
import os
from pathlib import Path

import pytest

from orchestrator.contract.deepspeed_config import build_deepspeed_config
from orchestrator.contract.layout import Layout

GOLDEN = Path(__file__).parent / "golden" / "deepspeed"
FAMILIES = {
    "data_parallel_zero2": Layout(dp=4, zero_stage=2, micro_batch=8, grad_accum=1),
    "zero3": Layout(dp=2, zero_stage=3, micro_batch=8, grad_accum=2),
    "tensor_parallel_recompute": Layout(
        dp=1, tp=2, zero_stage=1, micro_batch=8, grad_accum=4, recompute="selective"
    ),
    "pipeline_zero1": Layout(dp=1, pp=2, zero_stage=1, micro_batch=4, grad_accum=8),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_deepspeed_config_matches_its_golden(family, tiny_job):
    config = build_deepspeed_config(tiny_job(), FAMILIES[family])
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    golden = GOLDEN / f"{family}.json"
    if os.environ.get("MLA_UPDATE_GOLDEN"):
        golden.parent.mkdir(parents=True, exist_ok=True)
        golden.write_text(text)
    assert golden.is_file(), f"missing {golden}; run with MLA_UPDATE_GOLDEN=1 to create it"
    assert text == golden.read_text()


def test_image_ray_version_is_the_train_extra_pin():
    from orchestrator.k8s.render import RAY_VERSION

    pyproject = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    assert f']=={RAY_VERSION}"' in pyproject
