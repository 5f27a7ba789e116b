#!/bin/sh
# Layer-wise streaming and compressed KV over the netns testbed (root): TTFT of whole vs
# layerwise vs whole + int8 wire at 1 Gbit/s and 100 Mbit/s, then whole vs layerwise on the
# unshaped link (no regression); LEN=512,1024 prompts by default (LEN=512,2048 on a quiet
# machine: a prefill slower than the decode worker's 60 s KV timeout fails). Results under
# bench/results/.
DAY=$(date +%Y-%m-%d)
LEN=${LEN:-512,1024}
N=${N:-1}
MML="--max-model-len 4096"
python -m bench.crossnode --name lwxn --rates 1gbit,100mbit --placements remote \
    --input-len "$LEN" --num-prompts "$N" --warmup 1 \
    --serve-args "--kv-streaming whole $MML;--kv-streaming layerwise $MML;--kv-streaming whole --kv-wire-dtype int8 $MML" \
    --note "${NOTE:-}" --output "bench/results/crossnode_layerwise_cpu_${DAY}"
python -m bench.crossnode --name lwxn --rates unshaped --placements remote \
    --input-len "$LEN" --num-prompts "$N" --warmup 1 \
    --serve-args "--kv-streaming whole $MML;--kv-streaming layerwise $MML" \
    --note "${NOTE:-}" --output "bench/results/crossnode_layerwise_unshaped_cpu_${DAY}"
