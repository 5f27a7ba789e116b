#!/usr/bin/env bash
# Where should the proxy and the load generator run on a 2-core host? 1p1d on the prefill-heavy
# workload of bench/placement_sweep.sh (a) at 0.2 req/s, 20 requests, workers pinned one per core
# (--cpu-affinity 0,1): the proxy (the `pdserve serve` process) and the load generator (the
# `pdserve bench sweep` process) unpinned, then both on core 0 (the prefill worker's), alternating
# twice; servers at DEBUG, each point traced against PROFILE (`python -m bench.serving_trace`).
#
#   PROFILE=bench/results/profile_cpu_<date>.json bash bench/proxy_pin_check.sh
#
# Results: bench/results/proxy_pin_<mode>_<date>.{json,md} and their traces.
set -u -o pipefail
day=$(date -u +%Y-%m-%d)
export OMP_WAIT_POLICY=PASSIVE
common="--kv-cache-memory 256MiB --max-model-len 2048 --heartbeat-timeout-s 30 --cpu-affinity 0,1"
for mode in unpinned core0 unpinned2 core02; do
    pre=()
    case $mode in core0*) pre=(taskset -c 0) ;; esac
    out="bench/results/proxy_pin_${mode}_${day}"
    logs=$(mktemp -d)
    "${pre[@]}" pdserve bench sweep --config "1p1d=--prefill 1 --decode 1 --placement remote" \
        --serve-args "$common" --request-rates 0.2 --num-prompts 20 --seed 0 --slo-ttft 3s \
        --slo-tpot 300ms --warmup 2 --no-progress --input-len uniform:384:768 --output-len 8 \
        --note "proxy and load generator: $mode (core0 = taskset -c 0, the prefill worker's core)" \
        --output "$out" --server-log-level debug --log-dir "$logs" | tail -3
    python -m bench.serving_trace --sweep "$out.json" --log-dir "$logs" \
        --profile "${PROFILE:?a CPU profile of this machine}" --out "${out}_trace.md" | tail -1
done
