"""Layouts checked against explicit index formulas (independent of layouts.token_views), and
int4 packing against its written bit layout."""

from __future__ import annotations

import itertools

import pytest
import torch

from engine.kv_spec import KvDtype, KvKind, KvLayout, KvSpec
from transfer.convert.cache import PagedKvCache
from transfer.convert.quant import pack_int4, unpack_int4
from transfer.wire import layouts

B, S, H, D = 5, 4, 3, 16


def spec_id(s: KvSpec) -> str:
    return f"{s.layout.value}-{s.is_kv_stacked}-{s.dtype.value}"


def element(spec: KvSpec, tensors: tuple[torch.Tensor, ...], c: int, b: int, s: int, h: int,
            d: int) -> float:
    """The cache element of component c, block b, slot s, head h, dim d — written out per
    layout."""
    lay = spec.layout
    if lay is KvLayout.NHD:
        return float(tensors[0][c, b, s, h, d] if spec.is_kv_stacked else tensors[c][b, s, h, d])
    if lay is KvLayout.HND:
        return float(tensors[0][c, b, h, s, d] if spec.is_kv_stacked else tensors[c][b, h, s, d])
    if lay is KvLayout.PAGED_V1:
        x = spec.x
        return float(tensors[0][b, h, d // x, s, d % x] if c == 0 else tensors[1][b, h, d, s])
    if lay is KvLayout.FLASHINFER:
        return float(tensors[0][b, c, s, h, d])
    return float(tensors[0][b, s, d])


SPECS = [KvSpec(1, H, D, S, layout=lay, is_kv_stacked=st) for lay in (KvLayout.NHD, KvLayout.HND)
         for st in (True, False)] + [
    KvSpec(1, H, D, S, layout=KvLayout.PAGED_V1, dtype=KvDtype.FLOAT16),
    KvSpec(1, H, D, S, layout=KvLayout.PAGED_V1),  # fp32: x = 4
    KvSpec(1, H, D, S, layout=KvLayout.FLASHINFER),
    KvSpec(1, 1, D, S, layout=KvLayout.MLA, kind=KvKind.LATENT),
]


@pytest.mark.parametrize("spec", SPECS, ids=spec_id)
def test_token_reads_match_formula(spec: KvSpec) -> None:
    cache = PagedKvCache.allocate(spec, B)
    for i, t in enumerate(cache.layers[0]):  # distinct values everywhere (exact in fp16 too)
        t.copy_((torch.arange(t.numel()) % 2000 + 2000 * i).reshape(t.shape).to(t.dtype))
    table = [3, 0, 4]
    ids = torch.tensor(table)
    heads = spec.num_kv_heads
    for c in range(layouts.num_components(spec)):
        got = cache.read_tokens(0, c, ids, 2, 11)  # [T, H, D]
        for t, h, d in itertools.product(range(9), range(heads), range(D)):
            pos = 2 + t
            want = element(spec, cache.layers[0], c, table[pos // S], pos % S, h, d)
            assert float(got[t, h, d]) == want


@pytest.mark.parametrize("spec", SPECS, ids=spec_id)
def test_writes_land_where_the_formula_says(spec: KvSpec) -> None:
    cache = PagedKvCache.allocate(spec, B)
    ids = torch.tensor([1, 4])
    c = layouts.num_components(spec) - 1
    vals = torch.arange(3 * spec.num_kv_heads * D).reshape(3, spec.num_kv_heads, D)
    vals = vals.to(cache.layers[0][0].dtype)
    # positions 3 (block 1, slot 3), 4-5 (block 4, slots 0-1)
    cache.write_tokens(0, c, ids, 3, 6, vals)
    for t, (b, s) in enumerate([(1, 3), (4, 0), (4, 1)]):
        for h, d in itertools.product(range(spec.num_kv_heads), range(D)):
            assert element(spec, cache.layers[0], c, b, s, h, d) == float(vals[t, h, d])
    total = sum(float(t.float().abs().sum()) for t in cache.layers[0])
    assert total == float(vals.float().abs().sum())  # nothing else was touched


def test_shapes_match_kv_spec_docstring() -> None:
    spec = KvSpec(1, H, D, S, dtype=KvDtype.FLOAT16, layout=KvLayout.PAGED_V1)
    assert layouts.layer_tensor_shapes(spec, B) == [(B, H, D // 8, S, 8), (B, H, D, S)]
    int4 = spec.with_(dtype=KvDtype.INT4, head_dim=64, scale_granularity="per_token_head")
    # 64 int4 values = 32 bytes per head; x = 32 elements = 16 bytes
    assert layouts.layer_tensor_shapes(int4, B) == [(B, H, 2, S, 16), (B, H, 32, S)]
    flashinfer = KvSpec(1, H, D, S, layout=KvLayout.FLASHINFER)
    assert layouts.layer_tensor_shapes(flashinfer, B) == [(B, 2, S, H, D)]
    assert layouts.scale_tensor_shape(int4, B) == (2, B, S, H, 2)


def test_int4_bit_layout() -> None:
    q = torch.tensor([[1, -2, 7, -8]], dtype=torch.int8)
    packed = pack_int4(q)
    assert packed.tolist() == [[0xE1, 0x87]]  # element 2i in the low nibble, two's complement
    assert torch.equal(unpack_int4(packed), q)
    every = torch.arange(-8, 8, dtype=torch.int8).repeat(2).reshape(2, 16)
    assert torch.equal(unpack_int4(pack_int4(every)), every)


def test_as_rows_shares_memory() -> None:
    t = torch.zeros(4, 16, 3, 64, dtype=torch.bfloat16)
    rows = layouts.as_rows(t)
    assert rows.dtype == torch.int64 and rows.shape == (4, 16 * 3 * 64 * 2 // 8)
    rows[2].fill_(-1)
    assert bool(torch.isnan(t[2]).all()) and not bool(torch.isnan(t[1]).any())
