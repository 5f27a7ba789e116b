#!/usr/bin/env bash
# One GPU, one day, one code: the planner against a sweep measured on the same machine as its
# profile (issue 15). The 2xH200 sweep of 2026-11-22 is the only multi-GPU measurement and its
# code predates this profile's; a same-machine colocated sweep tells the model's error from
# that drift: its workload and engine flags are the 2xH200 sweep's, on one GPU
# (`--colocated --decode 1`).
#
#   bash bench/gpu_plan_check.sh      # repository root; carry .whl and .gl_models
#   (PROFILE=path: an existing profile of this GPU kind taken today with today's engine; on an
#   H100 the default is bench/results/profile_h100_llama3-8b-shape_bigchunks_2026-12-06.json;
#   else one is taken, BUDGET s; VALIDATE=0: the sweep only, validated afterwards elsewhere with
#   the same `python -m bench.plan_validate` lines: it needs no GPU; TRACE=0: servers at INFO,
#   else at DEBUG, and `python -m bench.serving_trace` tables each point's steps against the
#   profile's step model and the requests that missed the SLO; RATES=0.5,1: fewer rates)
#
# Writes, under $OUT (default bench/results): sweep_<gpu>x1_colocated_<date>.{json,md},
# plan_validation_gpu-<gpu>x1-same-day{,-cal}_<date>.{json,md}, the profile if taken, and logs.
set -u -o pipefail
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
source bench/gpu_env.sh
source bench/gpu_sweep_model.sh
BUDGET=${BUDGET:-240}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader

profile=${PROFILE:-}
if [ -z "$profile" ] && [ "$gpu" = h100 ]; then
    profile=bench/results/profile_h100_llama3-8b-shape_bigchunks_2026-12-06.json
fi
if [ -z "$profile" ] || [ ! -f "$profile" ]; then
    profile="$OUT/profile_${gpu}_llama3-8b-shape_${day}_plancheck.json"
    timeout $((BUDGET + 200)) $PY -m deploy.cli profile --out "$profile" --budget-s "$BUDGET" \
        --device cuda $ENGINE > "$OUT/profile_${gpu}_plancheck.log" 2>&1
    echo "profile rc=$? -> $profile"
fi

sweep="$OUT/sweep_${gpu}x1_colocated_${day}${TAG:+_$TAG}"
trace_flags=()
[ "${TRACE:-1}" = 0 ] || trace_flags=(--server-log-level debug)
timeout 300 $PY -m deploy.cli bench sweep --config "colocated-x1=--colocated --decode 1" \
    --serve-args "$ENGINE" --request-rates "${RATES:-0.5,1,2,4}" --num-prompts 24 --dataset synthetic \
    --input-len uniform:2048:7800 --output-len uniform:64:256 --tokenizer "$MODEL" --seed 0 \
    --slo-ttft 1s --slo-tpot 40ms --warmup 2 --no-progress \
    --note "one $gpu, colocated, the engine flags and workload of sweep_h200x2_2026-11-22" \
    --output "$sweep" --log-dir "$OUT/plancheck_logs" "${trace_flags[@]}" 2>&1 | tail -20
sweep_rc=$?
if [ "${TRACE:-1}" != 0 ]; then
    $PY -m bench.serving_trace --sweep "$sweep.json" --log-dir "$OUT/plancheck_logs" \
        --profile "$profile" --out "${sweep}_trace.md" 2>&1 | tail -60
fi
# the server log, compressed beside the sweep (a device call returns at most 8 files):
# `python -m bench.serving_trace --log-dir` reads it once unpacked as server_colocated-x1.log
gzip -c "$OUT/plancheck_logs/server_colocated-x1.log" > "${sweep}_server_log.gz" \
    && rm -rf "$OUT/plancheck_logs"

[ "${VALIDATE:-1}" = 0 ] && { echo "sweep rc=$sweep_rc (not validated here)"; exit "$sweep_rc"; }
for cal in "" colocated-x1; do
    tag="gpu-${gpu}x1-same-day${cal:+-cal}"
    timeout 240 $PY -m bench.plan_validate --profile "$profile" --out-dir "$OUT" \
        --sweeps "$sweep.json" ${cal:+--calibrate "$cal"} --tag "$tag" \
        --note "Profile and sweep on the same $gpu, same day and code${cal:+; serving overheads calibrated on colocated-x1 at its lowest rate}." \
        2>&1 | tail -25
done
echo "sweep rc=$sweep_rc"
[ "$sweep_rc" -eq 0 ]
