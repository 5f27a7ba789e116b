# Sourced after bench/gpu_env.sh by the planner's GPU scripts (gpu_profile.sh, gpu_plan_check.sh):
# the Llama-3-8B-shaped dummy model (made if missing, $MODEL), the engine flags the 2xH200 sweep
# of 2026-11-22 ran it with ($ENGINE), this GPU's short name ($gpu: h100, h200, ...) and $day.
MODEL=${MODEL:-.gl_models/llama3-8b-shape}
day=$(date -u +%Y-%m-%d)
[ -d "$MODEL" ] || $PY -m bench.make_dummy_model --preset llama3-8b --out "$MODEL"
gpu=$($PY -c "import torch; n = torch.cuda.get_device_name(); \
print('h200' if 'H200' in n else 'h100' if 'H100' in n else n.split()[-1].lower())")
ENGINE="--model $MODEL --load-format dummy --max-model-len 8192 --gpu-memory-utilization 0.85 \
--max-num-seqs 64 --max-num-batched-tokens 8192"
