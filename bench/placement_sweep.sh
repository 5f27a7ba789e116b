#!/usr/bin/env bash
# Adaptive placement against the two static splits on this machine's cores (issue 21's
# benchmark): 1p1d (--placement remote), colocated-x2, adaptive (1 prefill + 1 decode), each
# worker pinned to its own core with one torch thread (--cpu-affinity 0,1), the same two cores
# for every configuration; the proxy and the load generator are not pinned and share them.
#
#   bash bench/placement_sweep.sh [prefill_heavy|interference|both]
#   (NUM_PROMPTS=40 RATES_A=0.15,0.25,0.35 RATES_B=... SUFFIX=_hires: more requests, other rates,
#   another results name; TRACE=1: servers at DEBUG, logs kept in bench/results/logs_<name>...,
#   for `python -m bench.serving_trace`)
#
# Results: bench/results/placement_cpu_<workload>_<date>.{md,json,png} (+ the command).
set -u -o pipefail
which=${1:-both}
day=$(date -u +%Y-%m-%d)
export OMP_WAIT_POLICY=PASSIVE
common="--kv-cache-memory 256MiB --max-model-len 2048 --heartbeat-timeout-s 30 --cpu-affinity 0,1"

sweep() {  # name slo_ttft slo_tpot rates workload-flags...
    local name=$1 ttft=$2 tpot=$3 rates=$4 logs="/tmp/placement_$1_logs"
    [ -n "${TRACE:-}" ] && logs="bench/results/logs_placement_${name}_${day}${SUFFIX:-}"
    shift 4
    pdserve bench sweep \
        --config "1p1d=--prefill 1 --decode 1 --placement remote" \
        --config "colocated-x2=--colocated --decode 2" \
        --config "adaptive=--prefill 1 --decode 1 --placement adaptive --slo-ttft $ttft --slo-tpot $tpot" \
        --serve-args "$common" --request-rates "$rates" --num-prompts "${NUM_PROMPTS:-20}" --seed 0 \
        --slo-ttft "$ttft" --slo-tpot "$tpot" --warmup 2 --no-progress "$@" \
        --note "2-core VM; workers pinned one per core (--cpu-affinity 0,1), 1 torch thread each; proxy and load generator unpinned, sharing both cores. ${NUM_PROMPTS:-20} requests per rate." \
        --output "bench/results/placement_cpu_${name}_${day}${SUFFIX:-}" \
        ${TRACE:+--server-log-level debug} --log-dir "$logs"
}

if [ "$which" = prefill_heavy ] || [ "$which" = both ]; then
    # (a) long prompts, short outputs: one prefill core is the bottleneck of 1p1d
    sweep prefill_heavy 3s 300ms "${RATES_A:-0.1,0.2,0.3,0.4}" --input-len uniform:384:768 --output-len 8
fi
if [ "$which" = interference ] || [ "$which" = both ]; then
    # (b) short-to-medium prompts, longer outputs, tight TPOT: colocated prefills stall decodes
    sweep interference 2s 150ms "${RATES_B:-0.25,0.5,0.75,1,1.25}" --input-len 128 --output-len 48
fi
