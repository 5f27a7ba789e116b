#!/usr/bin/env bash
# Disaggregation on two GPUs of one host, in phases (each fits one device call):
#
#   bash bench/gpu_pd_check.sh transfer   # NCCL/CUDA transfer tests + NCCL transfer benchmark
#                                         # + control-path probe (bench/control_probe.py)
#                                         # + a 1P1D-over-NCCL serving smoke run with the share
#                                         #   of TTFT spent in KV transfer
#   bash bench/gpu_pd_check.sh sweep      # pdserve bench sweep: 1P1D over NCCL vs 2 colocated
#   bash bench/gpu_pd_check.sh receiver   # decode KV receiver thread vs between steps, over NCCL
#                                         # (bench/kv_receive.py)
#   bash bench/gpu_pd_check.sh serving    # the smoke run, then a shorter sweep
#
# Model: Llama-3-8B-shaped, random bf16 weights (--load-format dummy), SmolLM2's tokenizer;
# make the directory first with `python -m bench.make_dummy_model --out .gl_models/llama3-8b-shape`
# and carry .gl_models and .whl (pyzmq, fastapi, uvicorn, pydantic, gguf) with the call.
# Results and logs go under $OUT.
set -u -o pipefail
OUT=${OUT:-$PWD/gpu_pd_out}
mkdir -p "$OUT"
source bench/gpu_env.sh
MODEL=.gl_models/llama3-8b-shape
SERVE_ARGS="--model $MODEL --load-format dummy --max-model-len 8192 --gpu-memory-utilization 0.85 --max-num-seqs 64 --max-num-batched-tokens 8192"
WORKLOAD="--dataset synthetic --input-len uniform:2048:7800 --output-len uniform:64:256 --tokenizer $MODEL --seed 0"
SLO="--slo-ttft 1s --slo-tpot 40ms"

smoke() {  # one 1P1D deployment over NCCL: a bench run, then the transfer share of TTFT
    $PY -m deploy.cli serve --host 127.0.0.1 --port 0 --prefill 1 --decode 1 --transport nccl \
        $SERVE_ARGS >"$OUT/smoke_server.log" 2>&1 &
    local pid=$! url=""
    for _ in $(seq 240); do
        url=$(grep -o "http://127.0.0.1:[0-9]*" "$OUT/smoke_server.log" | head -1)
        [ -n "$url" ] && break
        kill -0 $pid 2>/dev/null || break
        sleep 1
    done
    if [ -z "$url" ]; then echo "server did not start"; tail -40 "$OUT/smoke_server.log"; kill $pid; return 1; fi
    curl -s "$url/v1/completions" -H 'Content-Type: application/json' \
        -d '{"prompt": "Hello", "max_tokens": 8, "temperature": 0}'; echo
    timeout 240 $PY -m deploy.cli bench --base-url "$url" $WORKLOAD $SLO --num-prompts ${SMOKE_PROMPTS:-32} \
        --request-rate 4 --warmup 2 --no-progress --result-file "$OUT/smoke_bench.json" 2>&1 | tail -30
    curl -s "$url/metrics" >"$OUT/smoke_metrics.txt"
    $PY - "$OUT/smoke_metrics.txt" <<'EOF'
import sys
vals = {}
for line in open(sys.argv[1]):
    if line.startswith("pdserve:") and " " in line:
        name, v = line.rsplit(" ", 1)
        vals[name] = vals.get(name, 0.0) + float(v)
kv_s = vals.get("pdserve:kv_transfer_seconds_total", 0.0)
kv_b = vals.get("pdserve:kv_transfer_bytes_total", 0.0)
ttft = vals.get("pdserve:time_to_first_token_seconds_sum", 0.0)
n = vals.get("pdserve:time_to_first_token_seconds_count", 0.0)
print(f"KV transferred: {kv_b / 1e9:.2f} GB in {kv_s:.3f} s ({kv_b / max(kv_s, 1e-9) / 1e9:.1f} GB/s); "
      f"mean TTFT {ttft / max(n, 1) * 1e3:.1f} ms over {n:.0f} requests; "
      f"KV transfer share of TTFT {kv_s / max(ttft, 1e-9):.1%}")
EOF
    kill -INT $pid; wait $pid
}

case "${1:-transfer}" in
transfer)
    nvidia-smi topo -m 2>&1 | tee "$OUT/topo.log"
    timeout 240 $PY -m pytest -q -p no:cacheprovider -rs --durations=5 tests/gpu/test_transfer_nccl.py \
        tests/gpu/test_block_copy.py tests/gpu/test_transfer_stream_cuda.py tests/gpu/test_transfer_matrix_cuda.py 2>&1 | tail -25 | tee "$OUT/gpu_transfer_tests.log"
    timeout 200 $PY -m bench.transfer --nccl --out "$OUT/transfer_nccl.json" 2>&1 | grep -v Warn | tail -30 | tee "$OUT/transfer_nccl.log"
    timeout 120 $PY -m bench.control_probe --out "$OUT/control_probe.json" 2>&1 | tail -14 | tee "$OUT/control_probe.log"
    smoke 2>&1 | tee "$OUT/smoke.log"
    ;;
receiver)
    timeout 420 $PY -m bench.kv_receive --serve-args "--transport nccl $SERVE_ARGS" --prompt-tokens 4000 \
        --busy 8 --busy-tokens 2000 --max-model-len 8192 --model-name "Llama-3-8B-shaped, random bf16, NCCL" \
        --out "$OUT/kv_receive_nccl.json" 2>&1 | tail -5
    ;;
serving)
    smoke 2>&1 | tee "$OUT/smoke.log"
    timeout 420 $PY -m deploy.cli bench sweep --config 1p1d-nccl="--prefill 1 --decode 1 --transport nccl" \
        --config colocated-x2="--colocated --decode 2" --serve-args "$SERVE_ARGS" \
        --request-rates ${RATES:-2,4,8} --num-prompts ${NUM_PROMPTS:-24} $WORKLOAD $SLO --warmup 2 --no-progress \
        --output "$OUT/sweep_h200x2" --log-dir "$OUT/sweeplogs" 2>&1 | tail -40
    ;;
sweep)
    timeout 560 $PY -m deploy.cli bench sweep --config 1p1d-nccl="--prefill 1 --decode 1 --transport nccl" \
        --config colocated-x2="--colocated --decode 2" --serve-args "$SERVE_ARGS" \
        --request-rates 2,4,6,8 --num-prompts 32 $WORKLOAD $SLO --warmup 2 --no-progress \
        --output "$OUT/sweep_h200x2" --log-dir "$OUT/sweeplogs" 2>&1 | tail -40
    ;;
esac
