"""KV memory planning: how many blocks fit, decided before any weight is loaded.

On CPU the budget is `--kv-cache-memory` (default 1 GiB). On CUDA it is
`--gpu-memory-utilization` x total device memory, minus what is already in use on the device
(other processes, this process's CUDA context and anything it allocated), minus the weights
not yet on the device, minus an activation reserve sized from the model and the step limits.
`--gpu-memory-utilization` is thus the share of the whole device in use once this engine's
cache is allocated (a second engine on the same GPU sees the first one's memory as in use:
give it the sum, e.g. 0.45 then 0.9). Planning again after the weights are on the device
measures them instead of estimating them (the in-use term then holds them, and no weights
are pending).
A `--max-model-len` longer than the cache can hold fails here, with both numbers and the flags
that fix it, instead of after a minute of loading.

Under tensor parallelism (`--tensor-parallel-size N`) a plan is one rank's: its cache holds
that rank's KV heads (engine/tp_plan.py), the budget (`--kv-cache-memory`, or
`--gpu-memory-utilization` of the rank's own device) is per rank, the weights counted are the
rank's shards; every rank allocates the same number of blocks (the smallest any rank can hold).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.config import EngineConfig, ModelConfig
from engine.errors import MemoryPlanError
from engine.kv_spec import KvDtype, KvLayout, KvSpec, model_fingerprint
from engine.tp_plan import TpPlan

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
        spec = self.spec
        per_rank = "" if spec.tp_size == 1 else (
            f" per rank (each of {spec.tp_size} TP ranks holds {spec.num_kv_heads} of "
            f"{spec.model_kv_heads} KV heads; {_fmt_bytes(self.total_bytes * spec.tp_size)} "
            f"over all ranks)")
        return (f"KV cache{per_rank}: {self.num_blocks} blocks x {self.spec.block_size} tokens = "
                f"{self.num_tokens} tokens, {_fmt_bytes(self.total_bytes)} "
                f"({self.spec.dtype.value} {self.spec.layout.value}, "
                f"{_fmt_bytes(self.spec.bytes_per_token)}/token, "
                f"budget from {self.budget_source}); max {self.max_concurrent_seqs} concurrent "
                f"sequences at --max-model-len {self.max_model_len}")


def kv_spec_for(model: ModelConfig, engine: EngineConfig, weights_identity: str = "",
                tp_rank: int = 0) -> KvSpec:
    """The spec of the cache TP rank `tp_rank` allocates (its KV heads only)."""
    tp = TpPlan(model, tp_rank, engine.tensor_parallel_size)
    return KvSpec(
        num_layers=model.num_layers, num_kv_heads=tp.num_kv_heads, head_dim=model.head_dim,
        tp_rank=tp_rank, tp_size=tp.size, kv_head_replicas=tp.kv_head_replicas,
        block_size=engine.block_size, dtype=_KV_DTYPES[engine.kv_torch_dtype],
        layout=KvLayout(engine.kv_cache_layout),
        is_kv_stacked=KvLayout(engine.kv_cache_layout) is not KvLayout.PAGED_V1,
        model_fingerprint=(model_fingerprint(model.arch_fields, weights_identity)
                           if weights_identity else ""))


CUDA_FIXED_RESERVE = 512 << 20
"""cuBLAS workspaces, CUDA-graph pools, kernel partials, allocator fragmentation."""


def weight_bytes(model: ModelConfig, dtype: torch.dtype, tp_size: int = 1) -> int:
    """Bytes of one rank's weights (the sharded matrices / tp_size; norms are small)."""
    return -(-model.num_params // tp_size) * torch.tensor([], dtype=dtype).element_size()


def activation_reserve_bytes(model: ModelConfig, engine: EngineConfig) -> int:
    """Peak memory of one step beside weights and KV cache, from the shapes the step can have."""
    elem = torch.tensor([], dtype=engine.torch_dtype).element_size()
    max_len = engine.max_model_len or min(model.max_position_embeddings, MAX_DEFAULT_MODEL_LEN)
    tp = TpPlan(model, 0, engine.tensor_parallel_size)  # one rank's widths
    q_width, kv_width = tp.num_heads * model.head_dim, tp.num_kv_heads * model.head_dim
    # per token in flight: hidden states and norms, q/k/v and their rotated copies, MLP gate/up/act
    per_token = (6 * model.hidden_size + 2 * (q_width + 2 * kv_width)
                 + 4 * tp.intermediate_size) * elem
    # fp32 logits of every sequence a step can sample, and the sampler's sorted copies
    logits = engine.max_num_seqs * model.vocab_size * 4 * 6
    # a prefill chunk attending to a full-length context: K/V expanded to all heads, bool mask
    attention = 2 * max_len * q_width * elem + engine.max_num_batched_tokens * max_len
    return engine.max_num_batched_tokens * per_token + logits + attention + CUDA_FIXED_RESERVE


def kv_budget_bytes(model: ModelConfig, engine: EngineConfig,
                    weights_on_device: bool = False) -> tuple[int, str]:
    """The KV budget in bytes and where it came from (the text names the flag and the terms).

    weights_on_device: the weights are already loaded on the device (measured in the in-use
    term instead of estimated from the parameter count)."""
    device = engine.torch_device
    if device.type != "cuda":
        budget = engine.kv_cache_memory or DEFAULT_CPU_KV_BYTES
        return budget, ("--kv-cache-memory" if engine.kv_cache_memory
                        else "default 1 GiB (--kv-cache-memory)")
    if engine.kv_cache_memory:
        return engine.kv_cache_memory, "--kv-cache-memory"
    free, total = torch.cuda.mem_get_info(device)
    # in use: other processes, our CUDA context and our live tensors; not the blocks our caching
    # allocator holds free (they are ours to reuse)
    cached_free = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    in_use = total - free - cached_free
    pending_weights = 0 if weights_on_device else weight_bytes(
        model, engine.torch_dtype, engine.tensor_parallel_size)
    reserve = activation_reserve_bytes(model, engine)
    util = engine.gpu_memory_utilization
    budget = int(total * util) - in_use - pending_weights - reserve
    return max(budget, 0), (f"--gpu-memory-utilization {util}: {_fmt_bytes(total)} x {util} - "
                            f"{_fmt_bytes(in_use)} in use - "
                            f"{_fmt_bytes(pending_weights)} weights to load - "
                            f"{_fmt_bytes(reserve)} activation reserve")


def plan_kv_cache(model: ModelConfig, engine: EngineConfig, weights_identity: str = "",
                  weights_on_device: bool = False, tp_rank: int = 0) -> KvPlan:
    """Decide the cache size (of TP rank `tp_rank`'s cache). Raises MemoryPlanError with the
    numbers and flags when it cannot work, ConfigError when the TP size does not fit the model.

    On CUDA, planning with `weights_on_device=True` after the weights are loaded measures them
    (see kv_budget_bytes); before loading, they are estimated from the parameter count."""
    spec = kv_spec_for(model, engine, weights_identity, tp_rank)
    max_len = engine.max_model_len or min(model.max_position_embeddings, MAX_DEFAULT_MODEL_LEN)
    if max_len > model.max_position_embeddings:
        raise MemoryPlanError(
            f"--max-model-len {max_len} is larger than the model's maximum of "
            f"{model.max_position_embeddings} positions; lower --max-model-len")
    budget, source = kv_budget_bytes(model, engine, weights_on_device)
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
