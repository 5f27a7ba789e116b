#!/usr/bin/env bash
# Check and time the engine on one CUDA GPU in one run: environment, GPU tests, benchmark.
#
#   bash bench/gpu_check.sh            # from the repository root; logs + results under $OUT
#
# Writes $OUT/env.log, $OUT/gpu_tests.log, $OUT/bench.log, $OUT/gpu_engine.{json,md}
# ($OUT defaults to ./gpu_check_out). Wheels in .whl/ (e.g. gguf, which engine.checkpoint
# imports and some GPU images lack) are installed to a temporary directory first.
# Each phase has its own time limit, so one hang cannot eat the others' time.
set -u -o pipefail
OUT=${OUT:-$PWD/gpu_check_out}
mkdir -p "$OUT"
source bench/gpu_env.sh

{
    nvidia-smi --query-gpu=name,memory.total,memory.used,clocks.sm,clocks.mem,driver_version --format=csv
    $PY -c "import torch, triton, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'triton', triton.__version__, 'transformers', transformers.__version__, '|', torch.cuda.get_device_name(), \
torch.cuda.get_device_properties(0).multi_processor_count, 'SMs')"
} 2>&1 | tee "$OUT/env.log"

timeout "${TEST_TIMEOUT:-300}" $PY -m pytest -q -p no:cacheprovider -rs --durations=8 \
    tests/gpu 2>&1 | tee "$OUT/gpu_tests.log"
tests_rc=$?

timeout "${BENCH_TIMEOUT:-300}" $PY -m bench.gpu_engine --out-dir "$OUT" 2>&1 | tee "$OUT/bench.log"
bench_rc=$?

echo "gpu tests rc=$tests_rc, bench rc=$bench_rc"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
