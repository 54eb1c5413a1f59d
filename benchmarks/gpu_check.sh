#!/usr/bin/env bash
# One-shot GPU check (run on a machine with a CUDA GPU and a CUDA build of PyTorch; no Ray,
# DeepSpeed or pydantic needed): the CUDA attention tests (FlexAttention local path vs blocked
# path, bf16 MLA vs the fp64 reference), then the attention benchmark in bf16 (dense SDPA with
# its FlashAttention backend vs MLA via FlexAttention). Writes gpu_bench.json and gpu_check.log
# into ${OUT:-.}.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-.}
export PYTHONPATH=$PWD
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  python3 -m pytest -q -p no:cacheprovider -o addopts= tests/test_attention.py tests/test_model.py 2>&1 | tail -4
  python3 - <<'PY'
import json, os
from rich.console import Console
from benchmarks.attention import AttentionBenchSettings, render, run_benchmark
settings = AttentionBenchSettings(device="cuda", repeats=10)
console = Console(stderr=False, width=140)
records = run_benchmark(settings, progress=lambda m: None)
render(records, settings, console)
with open(os.path.join(os.environ.get("OUT", "."), "gpu_bench.json"), "w") as fh:
    json.dump([r.to_json() for r in records], fh, indent=2)
PY
} 2>&1 | tee "$OUT/gpu_check.log"
