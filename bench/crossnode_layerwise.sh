#!/bin/sh
# Issue 17's benchmark over the netns testbed (root): TTFT of whole vs layerwise (4 and 16 layer
# groups) vs int8 on the wire (whole, and layerwise with 16 groups), at 10 Gbit/s and 1 Gbit/s,
# for ~1k and ~4k-token prompts, the prefill-only and transfer-only times from the same run
# (the `whole` twin: TTFT - KV seconds, KV seconds) and the overlap target table, then whole vs
# layerwise on the unshaped link (no regression). LEN, N, RATES, CONFIGS (';'-separated serve
# flags; $MML is the engine's) and SUFFIX (of the result files) override the defaults.
# Results under bench/results/.
DAY=$(date +%Y-%m-%d)
LEN=${LEN:-1024,4096}
N=${N:-1}
RATES=${RATES:-10gbit,1gbit}
MML="--max-model-len 8192 --kv-cache-memory 512MiB"
python -m bench.crossnode --name lwxn --rates "$RATES" --placements remote \
    --input-len "$LEN" --num-prompts "$N" --warmup 1 \
    --serve-args "${CONFIGS:-"--kv-streaming whole $MML;--kv-streaming layerwise $MML;--kv-streaming layerwise --kv-stream-groups 16 $MML;--kv-streaming whole --kv-wire-dtype int8 $MML;--kv-streaming layerwise --kv-stream-groups 16 --kv-wire-dtype int8 $MML"}" \
    --note "${NOTE:-}" --output "bench/results/crossnode_layerwise_1k4k_cpu_${DAY}${SUFFIX:-}"
if [ -z "${SKIP_UNSHAPED:-}" ]; then
    python -m bench.crossnode --name lwxn --rates unshaped --placements remote \
        --input-len "$LEN" --num-prompts "$N" --warmup 1 \
        --serve-args "--kv-streaming whole $MML;--kv-streaming layerwise --kv-stream-groups 16 $MML" \
        --note "${NOTE:-}" --output "bench/results/crossnode_layerwise_1k4k_unshaped_cpu_${DAY}"
fi
