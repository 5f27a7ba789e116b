"""Cache geometry: the shape of every tensor a `KvSpec` describes, and token-major views of them.

Owns shapes and views only: no dtype conversion, no copies, no I/O. Everything else in
`transfer/` reads geometry from here, never from a tensor's `.shape`.

Vocabulary (one layer; `n` blocks, `S` = block_size, `H` = heads carried, `D` = storage dim,
i.e. head_dim, or head_dim / 2 for packed int4; `x` = 16 bytes / storage itemsize):

- a *part* is one tensor family of a layer's cache as it travels on the wire:
  `k` and `v` (NHD, HND, paged-v1; stacked caches are split into their K and V halves),
  `kv` (FlashInfer, K and V interleaved per block), `latent` (MLA), and `scale`.
- part block shapes (`[n, ...]` with n leading):
    NHD k/v `[n, S, H, D]`, HND k/v `[n, H, S, D]`, paged-v1 k `[n, H, D/x, S, x]`,
    paged-v1 v `[n, H, D, S]`, FlashInfer kv `[n, 2, S, H, D]`, MLA latent `[n, S, D]`.
- a *component* is K (0) or V (1); a latent cache has one component (0).
- a *token view* of a part is a strided view `[n, S, H, *dims]` (prod(dims) == D) with tokens
  in the first two axes and heads in axis 2, whatever the layout; writes through it land in the
  cache.
- scales (float32, per layer, `C` components, `G` = int4 groups along head_dim, else 1):
  per-tensor `[C, G]`, per-head `[C, H, G]`, per-token-head `[C, B, S, H, G]` (paged like
  the cache). On the wire the per-token-head form is `[C, n, S, H, G]`.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import MappingProxyType

import torch

from engine.kv_spec import KvDtype, KvKind, KvLayout, KvSpec, ScaleGranularity

PART_K = "k"
PART_V = "v"
PART_KV = "kv"
PART_LATENT = "latent"
PART_SCALE = "scale"
ALL_PARTS = (PART_K, PART_V, PART_KV, PART_LATENT, PART_SCALE)

STORAGE_DTYPES = MappingProxyType({
    KvDtype.FLOAT32: torch.float32,
    KvDtype.FLOAT16: torch.float16,
    KvDtype.BFLOAT16: torch.bfloat16,
    KvDtype.FP8_E4M3: torch.float8_e4m3fn,
    KvDtype.FP8_E5M2: torch.float8_e5m2,
    KvDtype.INT8: torch.int8,
    KvDtype.INT4: torch.uint8,  # two 4-bit values per byte, low nibble first
})
# Names used in headers for tensor dtypes (the wire never carries torch reprs).
WIRE_DTYPES = MappingProxyType({
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float8_e4m3fn": torch.float8_e4m3fn,
    "float8_e5m2": torch.float8_e5m2,
    "int8": torch.int8,
    "uint8": torch.uint8,
})
SCALE_DTYPE = torch.float32


def storage_dtype(dtype: KvDtype) -> torch.dtype:
    return STORAGE_DTYPES[dtype]


def wire_dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def as_bits(t: torch.Tensor) -> torch.Tensor:
    """Same memory viewed as integers of the same width: bit-exact copies for dtypes whose
    CPU kernels lack copy ops (fp8 `index_copy_`)."""
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    return t.view(ints[t.element_size()])


def as_rows(t: torch.Tensor) -> torch.Tensor:
    """`[n, ...]` → `[n, row]` of the widest integer type dividing a row's bytes, sharing memory:
    block copies then run at memcpy speed (row-wise `index_select`/`index_copy_` on narrow
    float types are several times slower on CPU). Falls back to `as_bits` when not contiguous."""
    if not t.is_contiguous() or t.dim() == 0:
        return as_bits(t)
    row_bytes = t[0].numel() * t.element_size() if t.shape[0] else 0
    for width, dtype in ((8, torch.int64), (4, torch.int32), (2, torch.int16), (1, torch.uint8)):
        if row_bytes % width == 0 and t.element_size() <= width:
            return t.reshape(t.shape[0], -1).view(dtype)
    return as_bits(t)


def storage_dim(spec: KvSpec) -> int:
    """Elements of the storage dtype per head per token (packed int4 holds two per byte)."""
    return spec.head_dim // 2 if spec.dtype is KvDtype.INT4 else spec.head_dim


def paged_v1_x(spec: KvSpec) -> int:
    """paged-v1 key split in storage elements: 16 bytes' worth (== spec.x for unpacked dtypes)."""
    return 16 // storage_dtype(spec.dtype).itemsize


def num_components(spec: KvSpec) -> int:
    return 1 if spec.kind is KvKind.LATENT else 2


def scale_groups(spec: KvSpec) -> int:
    return spec.head_dim // spec.int4_group_size if spec.dtype is KvDtype.INT4 else 1


def has_scales(spec: KvSpec) -> bool:
    return spec.scale_granularity is not ScaleGranularity.NONE


def data_parts(spec: KvSpec) -> tuple[str, ...]:
    if spec.layout is KvLayout.MLA:
        return (PART_LATENT,)
    if spec.layout is KvLayout.FLASHINFER:
        return (PART_KV,)
    return (PART_K, PART_V)


def wire_parts(spec: KvSpec) -> tuple[str, ...]:
    """Parts a complete message for this spec carries (scales first)."""
    return ((PART_SCALE,) if has_scales(spec) else ()) + data_parts(spec)


def part_block_shape(spec: KvSpec, part: str, num_heads: int | None = None) -> tuple[int, ...]:
    """Shape of one block of `part` (without the leading block axis), carrying `num_heads`."""
    h = spec.num_kv_heads if num_heads is None else num_heads
    s, d = spec.block_size, storage_dim(spec)
    layout = spec.layout
    if part not in data_parts(spec):
        raise KeyError(f"part {part!r} is not part of a {layout.value} cache")
    if layout is KvLayout.NHD:
        return (s, h, d)
    if layout is KvLayout.HND:
        return (h, s, d)
    if layout is KvLayout.PAGED_V1:
        x = paged_v1_x(spec)
        return (h, d // x, s, x) if part == PART_K else (h, d, s)
    if layout is KvLayout.FLASHINFER:
        return (2, s, h, d)
    return (s, d)  # MLA


def head_axis(spec: KvSpec, part: str) -> int | None:
    """Axis of the heads in a part tensor `[n, ...]`; None for MLA (no head axis)."""
    return {
        KvLayout.NHD: 2, KvLayout.HND: 1, KvLayout.PAGED_V1: 1, KvLayout.FLASHINFER: 3,
        KvLayout.MLA: None,
    }[spec.layout]


def layer_tensor_shapes(spec: KvSpec, num_blocks: int) -> list[tuple[int, ...]]:
    """Shapes of the tensors one layer of a paged cache holds, in order (see kv_spec.py)."""
    parts = data_parts(spec)
    shapes = [(num_blocks, *part_block_shape(spec, p)) for p in parts]
    if spec.layout in (KvLayout.NHD, KvLayout.HND) and spec.is_kv_stacked:
        return [(2, *shapes[0])]
    return shapes


def split_parts(spec: KvSpec, tensors: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
    """One layer's cache tensors → `{part: tensor [B, *part_block_shape]}` (views, no copies)."""
    parts = data_parts(spec)
    if spec.layout in (KvLayout.NHD, KvLayout.HND) and spec.is_kv_stacked:
        (stacked,) = tensors
        return {PART_K: stacked[0], PART_V: stacked[1]}
    return dict(zip(parts, tensors, strict=True))


def token_views(spec: KvSpec, part: str, t: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
    """`t` = `[n, *part_block_shape]` → `[(component, view [n, S, H, *dims])]` sharing memory."""
    layout = spec.layout
    if layout is KvLayout.NHD:
        return [(0 if part == PART_K else 1, t)]
    if layout is KvLayout.HND:
        return [(0 if part == PART_K else 1, t.permute(0, 2, 1, 3))]
    if layout is KvLayout.PAGED_V1:
        if part == PART_K:  # [n, H, D/x, S, x] -> [n, S, H, D/x, x]
            return [(0, t.permute(0, 3, 1, 2, 4))]
        return [(1, t.permute(0, 3, 1, 2))]  # [n, H, D, S] -> [n, S, H, D]
    if layout is KvLayout.FLASHINFER:  # [n, 2, S, H, D]
        return [(0, t[:, 0]), (1, t[:, 1])]
    return [(0, t.unsqueeze(2))]  # MLA [n, S, D] -> [n, S, 1, D]


def scale_tensor_shape(spec: KvSpec, num_blocks: int) -> tuple[int, ...] | None:
    """Per-layer scale tensor a cache of this spec keeps next to its data (None: no scales)."""
    return scale_wire_shape(spec, spec.num_kv_heads, num_blocks) if has_scales(spec) else None


def scale_wire_shape(spec: KvSpec, num_heads: int, num_blocks: int) -> tuple[int, ...]:
    """Scales of one layer for `num_heads` heads and `num_blocks` blocks (per-token-head)."""
    c, g = num_components(spec), scale_groups(spec)
    gran = spec.scale_granularity
    if gran is ScaleGranularity.PER_TENSOR:
        return (c, g)
    if gran is ScaleGranularity.PER_HEAD:
        return (c, num_heads, g)
    if gran is ScaleGranularity.PER_TOKEN_HEAD:
        return (c, num_blocks, spec.block_size, num_heads, g)
    raise KeyError("spec has no scales")


def is_paged_scales(spec: KvSpec) -> bool:
    return spec.scale_granularity is ScaleGranularity.PER_TOKEN_HEAD
