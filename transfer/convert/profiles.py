"""GPU-architecture profiles: the KV cache common engines default to on each architecture, and
what each architecture cannot hold.

A profile turns a model's KV shape into the `KvSpec` a worker on that GPU would allocate
(`spec_for`), says whether a spec is holdable there (`check_spec` → `IncompatibleKv`), and
adapts a foreign spec to what it can hold (`adapt`: e.g. a bf16 source on Volta/Turing becomes
fp16; values beyond fp16's range are then reported by the conversion — `ValueOutOfRange`, or
clamped and counted with `OverflowPolicy.CLAMP` — never silently turned into inf).

| profile      | sm | default KV cache                                      | cannot hold        |
|--------------|----|-------------------------------------------------------|--------------------|
| volta        | 70 | fp16, paged-attention v1 (vLLM xformers/PagedAttn v1) | bf16, fp8, int4, MLA |
| turing       | 75 | fp16, FlashInfer [B, 2, S, H, D] (FA2 needs sm80)     | bf16, fp8, int4, MLA |
| ampere       | 80 | bf16, flash NHD, K/V stacked                          | fp8                |
| ampere_sm86  | 86 | bf16, NHD, K and V separate tensors                   | fp8                |
| ada          | 89 | fp8 e4m3 (per-tensor scales), NHD stacked             | —                  |
| hopper       | 90 | bf16, HND                                             | —                  |
| hopper_fp8   | 90 | fp8 e4m3 (per-head scales), HND                       | —                  |

MLA models always use the latent layout `[B, S, L]` in the profile's dtype; pre-Ampere
profiles refuse them (the MLA kernels of the engines modelled here need sm80+).
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.kv_spec import KvDtype, KvKind, KvLayout, KvSpec, ScaleGranularity
from transfer.wire.errors import IncompatibleKv

_ALL = frozenset(KvDtype)
_PRE_ADA = frozenset({KvDtype.FLOAT32, KvDtype.FLOAT16, KvDtype.BFLOAT16, KvDtype.INT8,
                      KvDtype.INT4})
_PRE_AMPERE = frozenset({KvDtype.FLOAT32, KvDtype.FLOAT16, KvDtype.INT8})


@dataclass(frozen=True)
class KvModelShape:
    """A model's KV geometry: total KV heads and head_dim (for MLA: 1 head of latent_dim)."""

    name: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    is_latent: bool = False

    def bytes_per_token(self, itemsize: int = 2) -> int:
        per_layer = self.num_kv_heads * self.head_dim * (1 if self.is_latent else 2)
        return self.num_layers * per_layer * itemsize


@dataclass(frozen=True)
class ArchProfile:
    name: str
    sm: int
    engine: str  # whose default cache this is
    dtype: KvDtype
    layout: KvLayout
    is_kv_stacked: bool
    scale_granularity: ScaleGranularity
    supported_dtypes: frozenset[KvDtype]
    supports_mla: bool

    def cannot_hold(self, spec: KvSpec) -> str | None:
        """Why this architecture cannot hold `spec`, or None."""
        if spec.dtype not in self.supported_dtypes:
            return f"{self.name} sm{self.sm} has no {spec.dtype.value} KV cache support"
        if spec.kind is KvKind.LATENT and not self.supports_mla:
            return (f"{self.name} sm{self.sm} cannot hold an MLA latent cache (its MLA kernels "
                    "need sm80+)")
        return None

    def check_spec(self, spec: KvSpec) -> None:
        reason = self.cannot_hold(spec)
        if reason:
            raise IncompatibleKv(reason, None, spec)

    def spec_for(self, shape: KvModelShape, block_size: int, *, tp_rank: int = 0, tp_size: int = 1,
                 model_fingerprint: str = "") -> KvSpec:
        """The cache a worker on this architecture allocates for `shape` (one TP rank of it)."""
        if shape.is_latent:
            spec = KvSpec(num_layers=shape.num_layers, num_kv_heads=1, head_dim=shape.head_dim,
                          block_size=block_size, dtype=self.dtype, layout=KvLayout.MLA,
                          kind=KvKind.LATENT, scale_granularity=self.scale_granularity,
                          tp_rank=tp_rank, tp_size=tp_size, model_fingerprint=model_fingerprint)
        else:
            replicas = max(1, tp_size // shape.num_kv_heads)
            spec = KvSpec(num_layers=shape.num_layers,
                          num_kv_heads=max(1, shape.num_kv_heads // tp_size),
                          head_dim=shape.head_dim, block_size=block_size, dtype=self.dtype,
                          layout=self.layout, is_kv_stacked=self.is_kv_stacked,
                          scale_granularity=self.scale_granularity, tp_rank=tp_rank,
                          tp_size=tp_size, model_fingerprint=model_fingerprint,
                          kv_head_replicas=replicas)
        self.check_spec(spec)
        return spec

    def adapt(self, spec: KvSpec) -> KvSpec:
        """`spec` as this architecture would hold it: its layout, and its dtype where the
        source's cannot be held (bf16/fp8 → fp16 on pre-Ampere, fp8 → bf16 on Ampere)."""
        dtype, gran = spec.dtype, spec.scale_granularity
        if dtype not in self.supported_dtypes:
            is_half = self.dtype in (KvDtype.FLOAT16, KvDtype.BFLOAT16)
            dtype = self.dtype if is_half else KvDtype.BFLOAT16
            gran = ScaleGranularity.NONE
        layout = KvLayout.MLA if spec.kind is KvKind.LATENT else self.layout
        out = spec.with_(dtype=dtype, layout=layout, is_kv_stacked=self.is_kv_stacked,
                         scale_granularity=gran)
        self.check_spec(out)
        return out


PROFILES: tuple[ArchProfile, ...] = (
    ArchProfile("volta", 70, "vLLM paged-attention v1 / xformers", KvDtype.FLOAT16,
                KvLayout.PAGED_V1, False, ScaleGranularity.NONE, _PRE_AMPERE, False),
    ArchProfile("turing", 75, "vLLM FlashInfer backend", KvDtype.FLOAT16, KvLayout.FLASHINFER,
                True, ScaleGranularity.NONE, _PRE_AMPERE, False),
    ArchProfile("ampere", 80, "vLLM FlashAttention backend", KvDtype.BFLOAT16, KvLayout.NHD,
                True, ScaleGranularity.NONE, _PRE_ADA, True),
    ArchProfile("ampere_sm86", 86, "separate K/V NHD caches", KvDtype.BFLOAT16, KvLayout.NHD,
                False, ScaleGranularity.NONE, _PRE_ADA, True),
    ArchProfile("ada", 89, "vLLM FlashAttention + fp8 KV cache", KvDtype.FP8_E4M3, KvLayout.NHD,
                True, ScaleGranularity.PER_TENSOR, _ALL, True),
    ArchProfile("hopper", 90, "FlashInfer / TRT-LLM HND", KvDtype.BFLOAT16, KvLayout.HND,
                True, ScaleGranularity.NONE, _ALL, True),
    ArchProfile("hopper_fp8", 90, "FlashInfer HND + fp8 KV cache", KvDtype.FP8_E4M3, KvLayout.HND,
                True, ScaleGranularity.PER_HEAD, _ALL, True),
)


def profile(name: str) -> ArchProfile:
    for p in PROFILES:
        if p.name == name:
            return p
    raise KeyError(f"unknown GPU profile {name!r}; known: {[p.name for p in PROFILES]}")


def profile_for_sm(sm: int) -> ArchProfile:
    """The default profile of a compute capability (e.g. 86 → ampere_sm86, 87 → ampere)."""
    exact = [p for p in PROFILES if p.sm == sm]
    if exact:
        return exact[0]
    older = [p for p in PROFILES if p.sm <= sm]
    if not older:
        raise KeyError(f"no profile for sm{sm} (oldest supported: sm70)")
    return max(older, key=lambda p: p.sm)
