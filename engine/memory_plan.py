"""KV memory planning: how many blocks fit, decided before any weight is loaded.

On CPU the budget is `--kv-cache-memory` (default 1 GiB). On CUDA it is
`--gpu-memory-utilization` x device memory, minus the weights and an activation reserve.
A `--max-model-len` longer than the cache can hold fails here, with both numbers and the flags
that fix it, instead of after a minute of loading.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.config import EngineConfig, ModelConfig
from engine.errors import MemoryPlanError
from engine.kv_spec import KvDtype, KvLayout, KvSpec, model_fingerprint

DEFAULT_CPU_KV_BYTES = 1 << 30
MAX_DEFAULT_MODEL_LEN = 8192

_KV_DTYPES = {torch.float32: KvDtype.FLOAT32, torch.float16: KvDtype.FLOAT16,
              torch.bfloat16: KvDtype.BFLOAT16}


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class KvPlan:
    spec: KvSpec
    num_blocks: int
    max_model_len: int
    max_num_seqs: int
    budget_source: str  # which flag the budget came from

    @property
    def num_tokens(self) -> int:
        return self.num_blocks * self.spec.block_size

    @property
    def total_bytes(self) -> int:
        return self.num_blocks * self.spec.bytes_per_block

    @property
    def max_concurrent_seqs(self) -> int:
        """Sequences of `max_model_len` tokens that fit at once (capped by --max-num-seqs)."""
        per_seq = -(-self.max_model_len // self.spec.block_size)
        return min(self.num_blocks // per_seq, self.max_num_seqs)

    def line(self) -> str:
        return (f"KV cache: {self.num_blocks} blocks x {self.spec.block_size} tokens = "
                f"{self.num_tokens} tokens, {_fmt_bytes(self.total_bytes)} "
                f"({self.spec.dtype.value} {self.spec.layout.value}, {_fmt_bytes(self.spec.bytes_per_token)}/token, "
                f"budget from {self.budget_source}); max {self.max_concurrent_seqs} concurrent "
                f"sequences at --max-model-len {self.max_model_len}")


def kv_spec_for(model: ModelConfig, engine: EngineConfig, weights_identity: str = "") -> KvSpec:
    return KvSpec(
        num_layers=model.num_layers, num_kv_heads=model.num_kv_heads, head_dim=model.head_dim,
        block_size=engine.block_size, dtype=_KV_DTYPES[engine.kv_torch_dtype],
        layout=KvLayout(engine.kv_cache_layout), is_kv_stacked=KvLayout(engine.kv_cache_layout) is not KvLayout.PAGED_V1,
        model_fingerprint=model_fingerprint(model.arch_fields, weights_identity) if weights_identity else "")


def kv_budget_bytes(model: ModelConfig, engine: EngineConfig) -> tuple[int, str]:
    device = engine.torch_device
    if device.type != "cuda":
        budget = engine.kv_cache_memory or DEFAULT_CPU_KV_BYTES
        return budget, "--kv-cache-memory" if engine.kv_cache_memory else "default 1 GiB (--kv-cache-memory)"
    if engine.kv_cache_memory:
        return engine.kv_cache_memory, "--kv-cache-memory"
    free, total = torch.cuda.mem_get_info(device)
    weight_bytes = model.num_params * torch.tensor([], dtype=engine.torch_dtype).element_size()
    activation_reserve = max(1 << 30, engine.max_num_batched_tokens * model.hidden_size * 64)
    used_by_others = total - free
    budget = int(total * engine.gpu_memory_utilization) - used_by_others - weight_bytes - activation_reserve
    return max(budget, 0), f"--gpu-memory-utilization {engine.gpu_memory_utilization}"


def plan_kv_cache(model: ModelConfig, engine: EngineConfig, weights_identity: str = "") -> KvPlan:
    """Decide the cache size. Raises MemoryPlanError with the numbers and flags when it cannot work."""
    spec = kv_spec_for(model, engine, weights_identity)
    max_len = engine.max_model_len or min(model.max_position_embeddings, MAX_DEFAULT_MODEL_LEN)
    if max_len > model.max_position_embeddings:
        raise MemoryPlanError(
            f"--max-model-len {max_len} is larger than the model's maximum of "
            f"{model.max_position_embeddings} positions; lower --max-model-len")
    budget, source = kv_budget_bytes(model, engine)
    num_blocks = budget // spec.bytes_per_block
    capacity = num_blocks * spec.block_size
    if capacity < max_len:
        need = -(-max_len // spec.block_size) * spec.bytes_per_block
        raise MemoryPlanError(
            f"--max-model-len {max_len} is larger than the {capacity} tokens the KV cache can hold "
            f"({_fmt_bytes(budget)} from {source}; one {max_len}-token sequence needs "
            f"{_fmt_bytes(need)}). Lower --max-model-len to at most {capacity}, or raise "
            f"--kv-cache-memory (CPU) / --gpu-memory-utilization (CUDA).")
    return KvPlan(spec, num_blocks, max_len, engine.max_num_seqs, source)
