#!/usr/bin/env bash
# Everything that needs a GPU, in one call from the repository root:
#   1. the whole test suite on CUDA (bf16 and the GPU-only tests included),
#   2. every benchmark suite through the report (JSON + plots).
# Uses the installed torch/triton (no network needed): PYTHONPATH points at the checkout.
# Results go to $OUT (default benchmarks/results).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python - <<'PY' | tee "$OUT/environment.txt"
import torch, triton
print("device:", torch.cuda.get_device_name(), "| torch", torch.__version__, "| triton", triton.__version__)
PY
python -m pytest -q -p no:cacheprovider tests 2>&1 | tail -n 60 | tee "$OUT/tests-cuda.log"
name=$(python -c "import torch,re,datetime;print(re.sub(r'[^a-z0-9]+','-',torch.cuda.get_device_name().lower()).strip('-')+'-'+datetime.date.today().isoformat())")
python -m benchmarks.report ${BENCH_ARGS:-} --out "$OUT/$name.json" 2>"$OUT/bench-progress.log" | tee "$OUT/bench-table.txt"
