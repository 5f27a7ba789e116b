"""KvSpec: the geometry of a paged KV cache, shared by the engine and the transfer layer.

This module has no dependency on networking or on the model code. The engine builds a
`KvSpec` for the cache it allocates; the transfer layer puts it in every wire header and
validates/converts against the receiver's own spec. Nothing about a cache is ever guessed
from a tensor's shape: it is read from here.

Tensor shapes per layout (one layer; `B` = num_blocks, `S` = block_size, `H` = kv heads,
`D` = head_dim, `L` = latent_dim, `x` = 16 bytes / element size):

- `NHD`:        K and V each `[B, S, H, D]` (stacked: `[2, B, S, H, D]`)
- `HND`:        K and V each `[B, H, S, D]` (stacked: `[2, B, H, S, D]`)
- `PAGED_V1`:   K `[B, H, D // x, S, x]`, V `[B, H, D, S]` (never stacked)
- `FLASHINFER`: one tensor `[B, 2, S, H, D]`
- `MLA`:        one latent tensor `[B, S, L]` (kind == LATENT)
"""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass, replace
from typing import Any

import xxhash


class KvKind(str, enum.Enum):
    KV = "kv"
    LATENT = "latent"


class KvLayout(str, enum.Enum):
    NHD = "NHD"
    HND = "HND"
    PAGED_V1 = "paged_v1"
    FLASHINFER = "flashinfer"
    MLA = "mla"


class KvDtype(str, enum.Enum):
    FLOAT32 = "float32"
    FLOAT16 = "float16"
    BFLOAT16 = "bfloat16"
    FP8_E4M3 = "float8_e4m3fn"
    FP8_E5M2 = "float8_e5m2"
    INT8 = "int8"
    INT4 = "int4"  # packed two per byte, with group scales

    @property
    def bits(self) -> int:
        return {"float32": 32, "float16": 16, "bfloat16": 16, "int4": 4}.get(self.value, 8)

    @property
    def is_quantized(self) -> bool:
        """True when values need scales to be read (int8, int4). fp8 may carry scales too."""
        return self in (KvDtype.INT8, KvDtype.INT4)


class ScaleGranularity(str, enum.Enum):
    NONE = "none"
    PER_TENSOR = "per_tensor"
    PER_HEAD = "per_head"
    PER_TOKEN_HEAD = "per_token_head"


class KvSpecError(ValueError):
    """A KvSpec whose fields contradict each other."""


@dataclass(frozen=True)
class KvSpec:
    """The complete description of one paged KV cache (or of the slice one TP rank holds).

    `num_kv_heads` is the number of heads *this* cache holds; with tensor parallelism, rank
    `tp_rank` of `tp_size` holds heads `[tp_rank * num_kv_heads, (tp_rank + 1) * num_kv_heads)`
    of `num_kv_heads * tp_size` in total.
    """

    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: KvDtype = KvDtype.FLOAT32
    layout: KvLayout = KvLayout.NHD
    kind: KvKind = KvKind.KV
    is_kv_stacked: bool = True  # K and V in one tensor on a leading axis of 2 (NHD/HND only)
    scale_granularity: ScaleGranularity = ScaleGranularity.NONE
    int4_group_size: int = 32  # elements per scale group along head_dim (INT4 only)
    tp_rank: int = 0
    tp_size: int = 1
    model_fingerprint: str = ""
    # With more TP ranks than model KV heads (MQA/GQA at high TP), each rank holds one head and
    # `kv_head_replicas` consecutive ranks hold the same head (vLLM's replication rule).
    kv_head_replicas: int = 1

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_kv_heads", "head_dim", "block_size", "tp_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise KvSpecError(f"KvSpec.{name} must be a positive int, got {value!r}")
        object.__setattr__(self, "dtype", KvDtype(self.dtype))
        object.__setattr__(self, "layout", KvLayout(self.layout))
        object.__setattr__(self, "kind", KvKind(self.kind))
        object.__setattr__(self, "scale_granularity", ScaleGranularity(self.scale_granularity))
        if not 0 <= self.tp_rank < self.tp_size:
            raise KvSpecError(f"tp_rank {self.tp_rank} outside tp_size {self.tp_size}")
        replicas = self.kv_head_replicas
        if not isinstance(replicas, int) or isinstance(replicas, bool) or replicas <= 0:
            raise KvSpecError(f"KvSpec.kv_head_replicas must be a positive int, got {replicas!r}")
        if self.tp_size % replicas or (replicas > 1 and self.num_kv_heads != 1):
            raise KvSpecError(
                f"kv_head_replicas {replicas} needs tp_size % replicas == 0 and one head per rank "
                f"(tp_size {self.tp_size}, num_kv_heads {self.num_kv_heads})"
            )
        if (self.kind is KvKind.LATENT) != (self.layout is KvLayout.MLA):
            raise KvSpecError(f"kind {self.kind.value} does not go with layout {self.layout.value}")
        if self.kind is KvKind.LATENT and self.num_kv_heads != 1:
            raise KvSpecError("a latent (MLA) cache has exactly one 'head' (num_kv_heads=1)")
        if self.layout is KvLayout.PAGED_V1 and self.head_dim % self.x != 0:
            raise KvSpecError(
                f"paged_v1 needs head_dim % x == 0 (head_dim {self.head_dim}, x {self.x})")
        if self.dtype.is_quantized and self.scale_granularity is ScaleGranularity.NONE:
            raise KvSpecError(f"dtype {self.dtype.value} needs a scale granularity")
        if self.dtype is KvDtype.INT4 and (
            self.int4_group_size <= 0 or self.head_dim % self.int4_group_size or self.head_dim % 2
        ):
            raise KvSpecError(f"int4 needs an even head_dim divisible by int4_group_size "
                              f"{self.int4_group_size}")

    # ---- derived values -------------------------------------------------------------------
    @property
    def x(self) -> int:
        """paged-attention-v1 split: elements per 16-byte chunk of the key's head_dim."""
        return max(1, 128 // self.dtype.bits)

    @property
    def num_tensors(self) -> int:
        """Cache tensors per layer (K and V separate = 2; stacked, FlashInfer or MLA = 1)."""
        if self.layout is KvLayout.PAGED_V1:
            return 2
        if self.layout in (KvLayout.FLASHINFER, KvLayout.MLA):
            return 1
        return 1 if self.is_kv_stacked else 2

    @property
    def total_kv_heads(self) -> int:
        return self.num_kv_heads * self.tp_size

    @property
    def model_kv_heads(self) -> int:
        """KV heads of the whole model (a latent cache counts as one head, on every TP rank)."""
        if self.kind is KvKind.LATENT:
            return 1
        return self.num_kv_heads * self.tp_size // self.kv_head_replicas

    @property
    def head_range(self) -> tuple[int, int]:
        """The model heads `[start, end)` this cache holds (MLA latent: always `(0, 1)`)."""
        if self.kind is KvKind.LATENT:
            return (0, 1)
        start = (self.tp_rank // self.kv_head_replicas) * self.num_kv_heads
        return (start, start + self.num_kv_heads)

    @property
    def elements_per_token_per_layer(self) -> int:
        per_head = self.head_dim * self.num_kv_heads
        return per_head if self.kind is KvKind.LATENT else 2 * per_head

    @property
    def bytes_per_token(self) -> int:
        """Cache bytes one token takes across all layers, scales excluded."""
        return self.num_layers * self.elements_per_token_per_layer * self.dtype.bits // 8

    @property
    def bytes_per_block(self) -> int:
        return self.bytes_per_token * self.block_size

    def fingerprint_compatible(self, other: KvSpec) -> bool:
        """Same model (or one side does not know): caches can be converted into each other."""
        return (
            not self.model_fingerprint
            or not other.model_fingerprint
            or self.model_fingerprint == other.model_fingerprint
        )

    def with_(self, **changes: Any) -> KvSpec:
        return replace(self, **changes)

    def describe(self) -> str:
        """One line naming every field that matters, for error messages and logs."""
        stacked = "stacked" if self.is_kv_stacked else "separate"
        return (
            f"KvSpec({self.kind.value} layers={self.num_layers} heads={self.num_kv_heads} "
            f"dim={self.head_dim} block={self.block_size} {self.dtype.value} {self.layout.value} "
            f"{stacked} scales={self.scale_granularity.value} tp={self.tp_rank}/{self.tp_size}"
            f"{f' replicas={self.kv_head_replicas}' if self.kv_head_replicas > 1 else ''} "
            f"model={self.model_fingerprint[:12] or '?'})"
        )

    # ---- wire form (plain types only; msgpack-safe) -----------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for key in ("dtype", "layout", "kind", "scale_granularity"):
            d[key] = d[key].value
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> KvSpec:
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise KvSpecError(f"unknown KvSpec fields {sorted(unknown)}")
        return cls(**d)


def model_fingerprint(arch_fields: dict[str, Any], weights_identity: str) -> str:
    """Deterministic hash of the architecture fields and an identity of the weights.

    Never Python's `hash()`: the value crosses processes and machines.
    """
    h = xxhash.xxh3_128()
    for key in sorted(arch_fields):
        h.update(f"{key}={arch_fields[key]!r};".encode())
    h.update(weights_identity.encode())
    return h.hexdigest()
