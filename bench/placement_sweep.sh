#!/usr/bin/env bash
# Adaptive placement against the two static splits on this machine's cores (issue 21's
# benchmark): 1p1d (--placement remote), colocated-x2, adaptive (1 prefill + 1 decode), each
# worker pinned to its own core with one torch thread (--cpu-affinity 0,1), the same two cores
# for every configuration; the proxy and the load generator are not pinned and share them
# (measured 2026-12-07: the proxy takes ~2.5 % of a core at 0.3 req/s, the load generator less).
#
#   bash bench/placement_sweep.sh [prefill_heavy|interference|both]
#   (NUM_PROMPTS=40 RATES_A=0.15,0.25,0.35 RATES_B=... SUFFIX=_hires: more requests, other rates,
#   another results name; TRACE=1: servers at DEBUG, logs kept (gzipped) in
#   bench/results/logs_<name>..., for `python -m bench.serving_trace`;
#   CONFIGS=colocated-x2[,adaptive]: only these configurations;
#   BRACKET=1: the planner's validation run (issue 15): each configuration is its own sweep,
#   with a CPU profile (`pdserve profile`, one thread on core 0) taken before it and one after
#   the last, so each configuration is predicted from the profile taken just before it and the
#   machine's drift shows between consecutive profiles)
#
# Results: bench/results/placement_cpu_<workload>_<date>[_<config>].{md,json,png} (+ the
# command); with BRACKET=1 also profile_cpu_<date><SUFFIX>_b<n>.json.
set -u -o pipefail
which=${1:-both}
day=$(date -u +%Y-%m-%d)
export OMP_WAIT_POLICY=PASSIVE
common="--kv-cache-memory 256MiB --max-model-len 2048 --heartbeat-timeout-s 30 --cpu-affinity 0,1"
profiles=0
rc=0  # any failed profile or sweep fails the script

profile() {  # a CPU profile as bench.plan_validate takes one (same engine flags as the workers)
    local out="bench/results/profile_cpu_${day}${SUFFIX:-}_b${profiles}.json"
    if pdserve profile --out "$out" --budget-s 240 --threads 1 --cpu-core 0 \
        --kv-cache-memory 256MiB --max-model-len 2048 > "${out%.json}.log" 2>&1; then
        echo "profile $profiles -> $out ($(date -u +%H:%M:%S))"
        rm -f "${out%.json}.log"
    else
        echo "profile $profiles failed: see ${out%.json}.log" >&2
        rc=1
    fi
    profiles=$((profiles + 1))
}

sweep() {  # name slo_ttft slo_tpot rates workload-flags...
    local name=$1 ttft=$2 tpot=$3 rates=$4
    shift 4
    local configs=("1p1d=--prefill 1 --decode 1 --placement remote"
                   "colocated-x2=--colocated --decode 2"
                   "adaptive=--prefill 1 --decode 1 --placement adaptive --slo-ttft $ttft --slo-tpot $tpot")
    if [ -n "${CONFIGS:-}" ]; then  # only these (comma-separated names), e.g. to re-measure one
        local keep=()
        for c in "${configs[@]}"; do
            case ",$CONFIGS," in *",${c%%=*},"*) keep+=("$c") ;; esac
        done
        configs=("${keep[@]}")
    fi
    if [ -z "${BRACKET:-}" ]; then
        one "$name" "$ttft" "$tpot" "$rates" "" "${configs[@]}" -- "$@"
        return
    fi
    for c in "${configs[@]}"; do
        profile
        one "$name" "$ttft" "$tpot" "$rates" "_${c%%=*}" "$c" -- "$@"
    done
}

one() {  # name slo_ttft slo_tpot rates tail configs... -- workload-flags...
    local name=$1 ttft=$2 tpot=$3 rates=$4 tail=$5 cfg=()
    shift 5
    while [ "$1" != -- ]; do cfg+=(--config "$1"); shift; done
    shift
    local stem="placement_cpu_${name}_${day}${SUFFIX:-}${tail}" logs
    if [ -n "${TRACE:-}" ]; then
        logs="bench/results/logs_placement_${name}_${day}${SUFFIX:-}${tail}"
    else
        logs=$(mktemp -d)
    fi
    pdserve bench sweep "${cfg[@]}" \
        --serve-args "$common" --request-rates "$rates" --num-prompts "${NUM_PROMPTS:-20}" --seed 0 \
        --slo-ttft "$ttft" --slo-tpot "$tpot" --warmup 2 --no-progress "$@" \
        --note "2-core VM; workers pinned one per core (--cpu-affinity 0,1), 1 torch thread each; proxy and load generator unpinned, sharing both cores. ${NUM_PROMPTS:-20} requests per rate." \
        --output "bench/results/${stem}" \
        ${TRACE:+--server-log-level debug} --log-dir "$logs" || rc=1
    if [ -n "${TRACE:-}" ]; then gzip -f "$logs"/*.log; fi
}

if [ "$which" = prefill_heavy ] || [ "$which" = both ]; then
    # (a) long prompts, short outputs: one prefill core is the bottleneck of 1p1d
    sweep prefill_heavy 3s 300ms "${RATES_A:-0.1,0.2,0.3,0.4}" --input-len uniform:384:768 --output-len 8
fi
if [ "$which" = interference ] || [ "$which" = both ]; then
    # (b) short-to-medium prompts, longer outputs, tight TPOT: colocated prefills stall decodes
    sweep interference 2s 150ms "${RATES_B:-0.25,0.5,0.75,1,1.25}" --input-len 128 --output-len 48
fi
if [ -n "${BRACKET:-}" ]; then profile; fi
exit "$rc"
