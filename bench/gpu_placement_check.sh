#!/usr/bin/env bash
# One GPU, one run: the single-GPU tests after the transfer/ restructuring, and how well the
# proxy's online step-time model predicts a Llama-3-8B-shaped engine's steps.
#
#   bash bench/gpu_placement_check.sh     # repository root; carry .whl and .gl_models
#
# Writes $OUT/env.log, $OUT/gpu_tests.log, $OUT/cost_fit.log and cost_fit_*.{json,md}.
set -u -o pipefail
OUT=${OUT:-$PWD/gpu_placement_out}
mkdir -p "$OUT"
source bench/gpu_env.sh
MODEL=${MODEL:-.gl_models/llama3-8b-shape}

gpu_env_record "$OUT/env.log"

timeout "${TEST_TIMEOUT:-300}" $PY -m pytest -q -p no:cacheprovider -rs --durations=5 \
    tests/gpu 2>&1 | tee "$OUT/gpu_tests.log"
tests_rc=$?

timeout "${FIT_TIMEOUT:-240}" $PY -m bench.cost_fit --model "$MODEL" --load-format dummy \
    --device cuda --max-model-len 4096 --requests 64 --tag cuda_llama3-8b-shape \
    --out-dir "$OUT" 2>&1 | tee "$OUT/cost_fit.log"
fit_rc=$?

echo "gpu tests rc=$tests_rc, cost fit rc=$fit_rc"
[ "$tests_rc" -eq 0 ] && [ "$fit_rc" -eq 0 ]
