#!/usr/bin/env bash
# Cold-start compiles on one GPU (2026-12-07): the colocated sweep of bench/gpu_plan_check.sh on
# a fresh machine with no profile taken first (so no Triton kernel is compiled before the
# sweep), its slowest steps from the server log, then the decode-kernel GPU tests (after the
# sweep: they would warm Triton's cache). Carry .whl and .gl_models.
#
#   TAG=splitfix bash bench/gpu_splitfix_check.sh
set -u -o pipefail
OUT=${OUT:-bench/results}
TAG=${TAG:-splitfix}
RATES=${RATES:-0.5,1,2,4} PROFILE=${PROFILE:-bench/results/profile_h100_llama3-8b-shape_2026-12-07_chunkfix.json} \
    VALIDATE=0 TAG=$TAG bash bench/gpu_plan_check.sh
rc=$?
echo "slowest steps (ms, what they held):"
zcat "$OUT"/sweep_*_"$TAG"_server_log.gz | grep -E "engine: step [0-9.]+ ms" \
    | sed -E 's/.*engine: step ([0-9.]+) ms: (.*)/\1 \2/' | sort -rn | head -10
source bench/gpu_env.sh
timeout 240 $PY -m pytest -q -p no:cacheprovider tests/gpu/test_engine_cuda.py -k "decode_kernel or write_kv" 2>&1 | tail -4
exit "$rc"
