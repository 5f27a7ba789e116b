#!/usr/bin/env bash
# One GPU: the planner's profile of the Llama-3-8B-shaped dummy model (the engine flags of the
# 2xH200 sweep of 2026-11-22), the planner against that sweep, and its 4- and 8-GPU predictions.
#
#   bash bench/gpu_profile.sh          # repository root; carry .whl and .gl_models
#
# Writes, under $OUT (default bench/results): profile_<gpu>_llama3-8b-shape_<date>.json,
# plan_validation_gpu-<gpu>_<date>.{json,md}, plan_<gpu>_<workload>_<n>gpu_<date>.{txt,json}
# and the logs. The KV transfer rate between two GPUs cannot be measured on one: the validation
# uses pdserve's NCCL path as measured on 2xH200 (205.8 GB/s at 4k tokens,
# bench/results/transfer_nccl_h200x2_2026-11-22.json), override with TRANSFER_GBPS. That sweep
# predates placement (every prompt ran on the prefill GPU): --unnamed-placement remote.
set -u -o pipefail
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
source bench/gpu_env.sh
source bench/gpu_sweep_model.sh
BUDGET=${BUDGET:-300}
TRANSFER_GBPS=${TRANSFER_GBPS:-205.8}
profile="$OUT/profile_${gpu}_llama3-8b-shape_${day}.json"

timeout $((BUDGET + 240)) $PY -m deploy.cli profile --out "$profile" --budget-s "$BUDGET" \
    --device cuda $ENGINE 2>&1 | tee "$OUT/profile_${gpu}.log"
prof_rc=$?

timeout 600 $PY -m bench.plan_validate --profile "$profile" --out-dir "$OUT" \
    --sweeps bench/results/sweep_h200x2_2026-11-22.json --transfer-gbps "$TRANSFER_GBPS" \
    --unnamed-placement remote --calibrate 1p1d-nccl \
    --tag "gpu-${gpu}" --note "Profile on one ${gpu}; KV transfer ${TRANSFER_GBPS} GB/s (pdserve \
NCCL path measured on 2xH200, transfer_nccl_h200x2_2026-11-22.json); serving overheads \
calibrated on 1p1d-nccl at its lowest rate." \
    2>&1 | tee "$OUT/plan_validation_${gpu}.log"
val_rc=$?
# the calibrated serving overheads (per request, per model step) go into the predictions
read -r REQ_OH STEP_OH < <($PY -c "import json, sys; d = json.load(open(sys.argv[1])); \
print(f\"{d['serving_overhead_s']:.6f} {d['step_overhead_s']:.6f}\")" "$OUT/plan_validation_gpu-${gpu}_${day}.json" \
    2>/dev/null || echo "0 0")

# predictions: the sweep's prefill-heavy workload, and an interference-prone one (medium
# prompts, long outputs), on 4 and 8 GPUs
predict() {  # name n workload-flags...
    local name=$1 n=$2
    shift 2
    timeout 300 $PY -m deploy.cli plan cluster --profile "$profile" --num-devices "$n" \
        --slo-ttft 1s --slo-tpot 40ms --transfer-gbps "$TRANSFER_GBPS" --num-prompts 200 \
        --remote-overhead "${REQ_OH}s" --local-overhead "${REQ_OH}s" --step-overhead "${STEP_OH}s" "$@" \
        --out "$OUT/plan_${gpu}_${name}_${n}gpu_${day}.json" \
        | tee "$OUT/plan_${gpu}_${name}_${n}gpu_${day}.txt"
}
for n in 4 8; do
    predict prefill_heavy $n --input-len uniform:2048:7800 --output-len uniform:64:256
    predict interference $n --input-len uniform:512:2048 --output-len uniform:256:512
done
echo "profile rc=$prof_rc, validation rc=$val_rc"
[ "$prof_rc" -eq 0 ] && [ "$val_rc" -eq 0 ]
