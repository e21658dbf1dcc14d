#!/usr/bin/env bash
# On a lent GPU machine (see bench/gpu/prepare.sh, run first where ../shared is), in the repo root:
#
#   bash bench/gpu/run.sh            # via the device tool: carry .devshared and .whl
#
# STEPS (default "tests bench") picks and orders what runs:
# 1. the CUDA tests (tests/modeling/test_cuda.py: bf16 on the GPU, the lean path there, train/resume/torchrun+NCCL);
# 2. the side-by-side benchmark at t5-base and t5-large shapes (batch 32), with softprompt's variants
#    (compile: --compile's CUDA graphs of the lean step; no-lean: transformers' modules).
# Logs and results go to $OUT (or ./gpu-out); the benchmark's table is printed last.
set -uo pipefail
OUT="${OUT:-gpu-out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false TQDM_DISABLE=1 HF_HUB_OFFLINE=1
export SOFTPROMPT_SHARED="$PWD/.devshared"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "wheel install failed"; exit 1; }
export PYTHONPATH="/tmp/site:$PWD/src:$PWD/tests"
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv
  python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
} 2>&1 | tee "$OUT/env.txt"

run_tests() {
  timeout "${TEST_TIMEOUT:-150}" python3 -m pytest -q -p no:cacheprovider tests/modeling/test_cuda.py 2>&1 \
    | tee "$OUT/test_cuda.log" | tail -15
}
run_bench() {
  timeout "${BENCH_TIMEOUT:-330}" python3 bench/bench_train_eval.py --device cuda --shapes ${SHAPES:-base large} \
    --variants ${VARIANTS:-default compile no-lean} --quiet 1 --update-docs 2>&1 | tee "$OUT/bench.log" \
    | grep -v "^\[" | tail -40
  cp bench/results/latest-cuda.json docs/performance.md "$OUT/" 2>/dev/null
  grep -h "^\[" "$OUT/bench.log" | tail -14
}
for step in ${STEPS:-tests bench}; do "run_$step"; done
