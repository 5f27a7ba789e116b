# Sourced by the GPU scripts: Python, the carried wheels (.whl/) and the repository on the path.
# The GPU image lacks some packages (pyzmq, fastapi, uvicorn, pydantic, gguf); a device call
# carries them as wheels and they are installed to a temporary directory here.
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
PY=${PY:-python3}
if ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/pdserve_site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/pdserve_site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

# gpu_env_record FILE: the date, the GPU and the torch/Triton versions, printed and kept in FILE
gpu_env_record() {
    {
        date -u
        nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
        $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', \
triton.__version__, torch.cuda.get_device_name())"
    } 2>&1 | tee "$1"
}
