#!/usr/bin/env bash
# One GPU, one call (issue 17 and the GPU questions of issues 15 and 21):
#  1. layer-wise streaming's CUDA path (events on the compute stream, the lane waiting on them)
#     and the CUDA stream-transfer tests;
#  2. why chunked prefill with cached context is slow on CUDA (bench/sdpa_probe.py per SDPA
#     backend, bench/chunk_context_probe.py on the engine, first run vs second);
#  3. raw step timings of the Llama-3-8B-shaped engine for the step-cost model (bench/cost_fit);
#  4. whole vs layer-wise KV over the netns testbed's shaped link (10 Gbit/s), both workers on
#     the one GPU, 4k-token prompts (falls back to the unshaped testbed, then to TCP on
#     127.0.0.1, where the machine has no ip/tc).
#
# The record of the 2026-12-06 H100 call (bench/results/*h100*2026-12-06*), which found the
# fused-pass hook bug; bench/gpu_layerwise_confirm.sh is the check after the fix.
#
#   OUT=/tmp/x bash bench/gpu_layerwise_check.sh   # repository root; carry .whl and .gl_models
set -u -o pipefail
OUT=${OUT:-$PWD/gpu_layerwise_out}
mkdir -p "$OUT"
source bench/gpu_env.sh
MODEL=${MODEL:-.gl_models/llama3-8b-shape}
gpu_env_record "$OUT/env.log"

timeout 150 $PY -m pytest -q -p no:cacheprovider -rs tests/unit/test_layer_stream.py \
    tests/gpu/test_transfer_stream_cuda.py 2>&1 | tail -8 | tee "$OUT/layerwise_tests.log"
timeout 60 $PY -m bench.sdpa_probe --out "$OUT/sdpa_probe.json" 2>&1 | tail -6 | tee "$OUT/sdpa_probe.log"
timeout 120 $PY -m bench.chunk_context_probe --model "$MODEL" --load-format dummy \
    --out "$OUT/chunk_context_probe.json" 2>&1 | tail -10 | tee "$OUT/chunk_context_probe.log"
timeout 120 $PY -m bench.cost_fit --model "$MODEL" --load-format dummy --device cuda \
    --max-model-len 4096 --requests 64 --tag cuda_llama3-8b-shape --out-dir "$OUT" 2>&1 \
    | tail -12 | tee "$OUT/cost_fit.log"

if $PY -m bench.netns --name probe up --rate 10gbit >"$OUT/netns.log" 2>&1; then
    rates=10gbit
elif $PY -m bench.netns --name probe up --unshaped >>"$OUT/netns.log" 2>&1; then
    rates=unshaped
else
    rates=loopback  # no ip/tc here: the KV still crosses TCP on 127.0.0.1
fi
$PY -m bench.netns --name probe down >>"$OUT/netns.log" 2>&1
echo "testbed: $rates" | tee -a "$OUT/netns.log"
    GPU_ARGS="--model $MODEL --load-format dummy --kv-cache-memory 8GiB --max-model-len 8192 --max-num-batched-tokens 8192"
    timeout ${XN_TIMEOUT:-330} $PY -m bench.crossnode --name lwg --rates "$rates" --placements remote \
        --input-len 4000 --num-prompts 2 --warmup 1 --bench-args "--tokenizer $MODEL" \
        --serve-args "--kv-streaming whole $GPU_ARGS;--kv-streaming layerwise $GPU_ARGS;--kv-streaming layerwise --kv-stream-groups 16 $GPU_ARGS" \
        --note "one GPU (both workers on it, 8 GiB of KV each), Llama-3-8B-shaped random bf16 weights; prompts sent one at a time" \
        --output "$OUT/crossnode_layerwise_gpu" 2>&1 | tail -12 | tee "$OUT/crossnode.log"
echo done
