#!/usr/bin/env bash
# One GPU, one call (issue 17): where a layer-wise stream's time goes on CUDA. Whole vs
# layer-wise (6 tapered groups, and 2 groups) KV of 4000-token prompts over TCP on 127.0.0.1,
# both workers on the one GPU, servers at DEBUG so bench.crossnode tables the prefill worker's
# send lane per stream: waiting for parts, for their layers (the CUDA event), pack, payload
# (of which filling buffers: the gather and the device-to-host copy) and acks. First the CUDA
# stream-transfer tests (the sender's pinned host slots, the receiver's pinned staging).
#
#   OUT=/tmp/x bash bench/gpu_layerwise_phases.sh   # repository root; carry .whl and .gl_models
set -u -o pipefail
OUT=${OUT:-$PWD/gpu_layerwise_phases_out}
mkdir -p "$OUT"
source bench/gpu_env.sh
MODEL=${MODEL:-.gl_models/llama3-8b-shape}
gpu_env_record "$OUT/env.log"
timeout 200 $PY -m pytest -q -p no:cacheprovider -rs tests/gpu/test_transfer_stream_cuda.py \
    tests/unit/test_transfer_parts.py tests/unit/test_layer_stream.py 2>&1 | tail -6 \
    | tee "$OUT/tests.log"
ARGS="--model $MODEL --load-format dummy --kv-cache-memory 8GiB --max-model-len 8192 --max-num-batched-tokens 8192"
timeout ${XN_TIMEOUT:-420} $PY -m bench.crossnode --name lwp --rates loopback --placements remote \
    --input-len 4000 --num-prompts 3 --warmup 1 --bench-args "--tokenizer $MODEL" \
    --server-log-level debug --log-dir "$OUT/logs" \
    --serve-args "--kv-streaming whole $ARGS;--kv-streaming layerwise $ARGS;--kv-streaming layerwise --kv-stream-groups 2 $ARGS" \
    --note "one GPU (both workers on it, 8 GiB of KV each), Llama-3-8B-shaped random bf16 weights; servers at DEBUG (lane phases)" \
    --output "$OUT/crossnode_layerwise_phases_gpu" 2>&1 | tail -16 | tee "$OUT/crossnode.log"
grep -h "KV stream" "$OUT"/logs/*.log | tail -12
