"""TpPlan: how one tensor-parallel rank's share of a Llama-family model is cut (Megatron-style).

Pure arithmetic on a `ModelConfig`, no communication: the model (engine/model.py) sizes its
layers from it, the loaders (engine/safetensors_loader.py, engine/gguf_loader.py) read only the
rows or columns it names, the memory plan counts the rank's KV heads and weights from it.

- q/k/v and gate/up are column-parallel (output rows split), o and down row-parallel (input
  columns split; their outputs are summed across ranks with one all-reduce each).
- Query heads split evenly; KV heads split evenly when TP divides them, and are replicated when
  TP is a multiple of them (vLLM's rule): rank r then holds KV head r // (TP / num_kv_heads).
- Embedding and LM head are vocab-parallel: rank r holds rows [r * V', (r + 1) * V') of
  V' = ceil(vocab / TP); rows past the vocabulary are zero padding on the last rank.
- Norms are replicated.

A TP size the model cannot be cut by fails here, with the numbers and the flag.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from engine.config import ConfigError, ModelConfig

TP_FLAG = "--tensor-parallel-size"
_LAYER_RE = re.compile(r"^model\.layers\.\d+\.(\w+)\.(\w+)\.(weight|bias)$")
_COLUMN_PARALLEL = {"q_proj": "q", "k_proj": "kv", "v_proj": "kv", "gate_proj": "ffn",
                    "up_proj": "ffn"}
_ROW_PARALLEL = {"o_proj": "q", "down_proj": "ffn"}


@dataclass(frozen=True)
class Shard:
    """The part of a full tensor a rank holds: `[start, stop)` along `dim`, padded with zeros
    to `size` (only the vocabulary's last shard is ever padded)."""

    dim: int
    start: int
    stop: int
    size: int


@dataclass(frozen=True)
class TpPlan:
    config: ModelConfig
    rank: int = 0
    size: int = 1

    def __post_init__(self) -> None:
        cfg, tp = self.config, self.size
        if not isinstance(tp, int) or tp <= 0:
            raise ConfigError(f"{TP_FLAG} must be a positive integer, got {tp!r}")
        if not 0 <= self.rank < tp:
            raise ConfigError(f"tensor-parallel rank {self.rank} outside {TP_FLAG} {tp}")
        if cfg.num_heads % tp:
            raise ConfigError(
                f"{TP_FLAG} {tp} does not divide the model's {cfg.num_heads} attention heads; "
                f"choose a divisor of {cfg.num_heads} ({_divisors(cfg.num_heads)})")
        kv = cfg.num_kv_heads
        if kv % tp and tp % kv:
            raise ConfigError(
                f"{TP_FLAG} {tp} neither divides nor is a multiple of the model's {kv} KV heads "
                f"(KV heads are split, or replicated when TP is a multiple of them); choose one of "
                f"{[d for d in _divisors(cfg.num_heads) if kv % d == 0 or d % kv == 0]}")
        if cfg.intermediate_size % tp:
            raise ConfigError(f"{TP_FLAG} {tp} does not divide the model's MLP width "
                              f"{cfg.intermediate_size}")

    # ---- per-rank sizes ------------------------------------------------------------------------
    @property
    def num_heads(self) -> int:
        """Query heads on this rank."""
        return self.config.num_heads // self.size

    @property
    def kv_head_replicas(self) -> int:
        """Ranks holding the same KV head (1 unless TP exceeds the KV heads)."""
        return max(1, self.size // self.config.num_kv_heads)

    @property
    def num_kv_heads(self) -> int:
        """KV heads on this rank (and in its paged cache)."""
        return max(1, self.config.num_kv_heads // self.size)

    @property
    def kv_head_start(self) -> int:
        return (self.rank // self.kv_head_replicas) * self.num_kv_heads

    @property
    def intermediate_size(self) -> int:
        return self.config.intermediate_size // self.size

    @property
    def vocab_per_rank(self) -> int:
        return -(-self.config.vocab_size // self.size)

    @property
    def vocab_start(self) -> int:
        return self.rank * self.vocab_per_rank

    # ---- weights -------------------------------------------------------------------------------
    def _span(self, kind: str) -> tuple[int, int]:
        """[start, stop) of this rank's share of a q / kv / ffn axis."""
        d = self.config.head_dim
        if kind == "q":
            return self.rank * self.num_heads * d, (self.rank + 1) * self.num_heads * d
        if kind == "kv":
            return self.kv_head_start * d, (self.kv_head_start + self.num_kv_heads) * d
        width = self.intermediate_size
        return self.rank * width, (self.rank + 1) * width

    def shard(self, name: str) -> Shard | None:
        """The part of HF-named tensor `name` this rank holds; None = the whole tensor."""
        if self.size == 1:
            return None
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            stop = min(self.vocab_start + self.vocab_per_rank, self.config.vocab_size)
            return Shard(0, self.vocab_start, stop, self.vocab_per_rank)
        m = _LAYER_RE.match(name)
        if m is None:
            return None
        proj = m.group(2)
        if proj in _COLUMN_PARALLEL:
            start, stop = self._span(_COLUMN_PARALLEL[proj])
            return Shard(0, start, stop, stop - start)
        if proj in _ROW_PARALLEL and m.group(3) == "weight":
            start, stop = self._span(_ROW_PARALLEL[proj])
            return Shard(1, start, stop, stop - start)
        return None

    def local_shape(self, name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The shape this rank holds of a tensor whose full shape is `shape`."""
        shard = self.shard(name)
        if shard is None:
            return shape
        return (*shape[:shard.dim], shard.size, *shape[shard.dim + 1:])

    def describe(self) -> str:
        cfg = self.config
        replicas = self.kv_head_replicas
        return (f"TP rank {self.rank} of {self.size}: {self.num_heads} of {cfg.num_heads} query "
                f"heads, {self.num_kv_heads} of {cfg.num_kv_heads} KV heads"
                f"{f' (each on {replicas} ranks)' if replicas > 1 else ''}"
                f", {self.vocab_per_rank} of {cfg.vocab_size} vocabulary rows")


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]
