#!/usr/bin/env bash
# One-shot GPU check of MLA attention, one command, < 8 minutes on one H200 (torch 2.11 / triton
# 3.6; no Ray, no pydantic needed; DeepSpeed used for the model step when importable, e.g. from
# wheels in $MLA_WHEELS, else a plain torch loop, labelled in the JSON):
#   1. the CUDA tests in bf16 against an fp32 reference (tests/test_flex_cuda.py, the CUDA tests
#      of tests/test_attention.py), 120 s at most;
#   2. python -m benchmarks.gpu_check: recompile count, dense SDPA (fastest backend) vs MLA at
#      n = 4k..64k for B=1 H=4 d=64 and B=1 Hq=16 Hkv=4 d=128 (CUDA-event medians of 20 runs),
#      a ~1B training step dense vs MLA at 16k, kernel counts, a block-64 compile probe.
# Writes $OUT/gpu_check.log, $OUT/gpu_check.json and $OUT/pytest.log. Exit status: 0 only when
# the tests passed and the check recorded no failure.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-.}
mkdir -p "$OUT"
export PYTHONPATH=$PWD OUT
status=0
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || status=1
  python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__); assert torch.cuda.is_available(), 'no CUDA device'" || status=1
  if ! python3 -c "import deepspeed" 2>/dev/null && [ -n "${MLA_WHEELS:-}" ]; then
    python3 -m pip install -q --no-index --find-links "$MLA_WHEELS" deepspeed || echo "DeepSpeed wheels did not install: the model step uses a plain torch loop"
  fi
  timeout 120 python3 -m pytest -q -p no:cacheprovider -o addopts= -rs tests/test_flex_cuda.py \
      tests/test_attention.py -k "cuda" > "$OUT/pytest.log" 2>&1
  rc=$?
  tail -15 "$OUT/pytest.log"
  if [ $rc -ne 0 ]; then echo "FAIL: CUDA tests (exit $rc; 124 = timed out), see pytest.log"; status=1; fi
  if grep -q "skipped" "$OUT/pytest.log" && ! grep -q " passed" "$OUT/pytest.log"; then
    echo "FAIL: the CUDA tests were skipped"; status=1
  fi
  timeout 320 python3 -m benchmarks.gpu_check --out "$OUT" --budget-s 290
  rc=$?
  if [ $rc -ne 0 ]; then echo "FAIL: benchmarks.gpu_check (exit $rc; 124 = timed out; partial JSON kept)"; status=1; fi
  date -u
  echo "gpu_check.sh exit status $status"
  exit $status
} 2>&1 | tee "$OUT/gpu_check.log"
exit "${PIPESTATUS[0]}"
