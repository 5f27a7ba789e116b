#!/usr/bin/env bash
# One GPU, one call: does layer-wise KV streaming now give whole's tokens and bytes on CUDA?
# (issue 17; the H100 run of 2026-12-06 sent one layer group of four: the fused CUDA pass ran
# no layer hook; fixed in engine/triton_layers.py, prefill/layer_stream.py, endpoint/parts.py.)
#  1. the unit tests that run on CUDA: the fused pass's hooks, a small CUDA layer-wise stream
#     (fused pass + a CUDA-graph 1-token chunk) equal to a colocated CUDA engine, the parts;
#  2. bench.stream_equal on the Llama-3-8B-shaped dummy model: whole x2 (the control),
#     layerwise, layerwise with 16 groups and 512-token chunks; exit 1 when texts differ;
#  3. KV bytes and TTFT per request, whole vs layerwise (4 and 16 groups), 4000-token prompts,
#     over TCP on 127.0.0.1: the bytes must be equal in every mode.
# Passed on an H100, 2026-12-06 (bench/results/*hookfix*): CUDA layer-wise is no longer refused.
#
#   OUT=/tmp/x bash bench/gpu_layerwise_confirm.sh   # repository root; carry .whl and .gl_models
set -u -o pipefail
OUT=${OUT:-$PWD/gpu_layerwise_confirm_out}
mkdir -p "$OUT"
source bench/gpu_env.sh
MODEL=${MODEL:-.gl_models/llama3-8b-shape}
gpu_env_record "$OUT/env.log"

timeout 200 $PY -m pytest -q -p no:cacheprovider -rs tests/unit/test_fused_layer_hooks.py \
    tests/unit/test_layer_stream.py tests/unit/test_transfer_parts.py \
    tests/gpu/test_transfer_stream_cuda.py 2>&1 | tail -12 | tee "$OUT/layerwise_tests.log"

ARGS="--model $MODEL --load-format dummy --kv-cache-memory 8GiB --max-model-len 8192"
timeout 420 $PY -m bench.stream_equal --serve-args "$ARGS --max-num-batched-tokens 8192" \
    --out "$OUT/stream_equal.json" 2>&1 | tail -8 | tee "$OUT/stream_equal.log"

ARGS="$ARGS --max-num-batched-tokens 8192"
timeout ${XN_TIMEOUT:-330} $PY -m bench.crossnode --name lwc --rates loopback --placements remote \
    --input-len 4000 --num-prompts 2 --warmup 1 --bench-args "--tokenizer $MODEL" \
    --serve-args "--kv-streaming whole $ARGS;--kv-streaming layerwise $ARGS;--kv-streaming layerwise --kv-stream-groups 16 $ARGS" \
    --note "one GPU (both workers on it, 8 GiB of KV each), Llama-3-8B-shaped random bf16 weights; after the layer-hook fix" \
    --output "$OUT/crossnode_layerwise_gpu" 2>&1 | tail -12 | tee "$OUT/crossnode.log"
echo done
