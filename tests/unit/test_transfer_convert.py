"""Conversion beyond the profile matrix: TP head slicing/concatenation, exact partial writes,
every quantized format, overflow reporting, incompatible specs, the lower-level decode API."""

from __future__ import annotations

import pytest
import torch

from bench.kv_fill import calibrate_scales, fill_random
from engine.kv_spec import KvDtype, KvKind, KvLayout, KvSpec, ScaleGranularity
from transfer.convert.cache import PagedKvCache
from transfer.convert.canonical import decode_to_tensors
from transfer.convert.local import convert_kv, read_tokens_float, write_kv
from transfer.convert.pack import pack_kv
from transfer.convert.plan import ConvertOptions, check_compatible
from transfer.convert.profiles import KvModelShape, profile, profile_for_sm
from transfer.convert.quant import OverflowPolicy, tolerance
from transfer.wire.errors import ChecksumMismatch, IncompatibleKv, ValueOutOfRange
from transfer.wire.header import ReceiverLimits, compute_checksum, decode_header

GQA = KvSpec(2, 4, 64, 16, dtype=KvDtype.BFLOAT16)
TOK = (0, 50)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def source(spec: KvSpec = GQA, seed: int = 0) -> tuple[PagedKvCache, list[int]]:
    cache = PagedKvCache.allocate(spec, 10)
    fill_random(cache, torch.Generator().manual_seed(seed))
    return cache, [6, 1, 8, 3][: -(-TOK[1] // spec.block_size)]


def test_tp_one_to_two_full_message_and_sender_slice() -> None:
    src, table = source()
    want = read_tokens_float(src, table, *TOK)
    for rank in (0, 1):
        for sliced in (False, True):
            dst_spec = GQA.with_(num_kv_heads=2, tp_rank=rank, tp_size=2, layout=KvLayout.HND)
            dst = PagedKvCache.allocate(dst_spec, 10)
            heads = dst_spec.head_range if sliced else None
            report = convert_kv(src, table, dst, [9, 0, 2, 5], *TOK, head_range=heads)
            got = read_tokens_float(dst, [9, 0, 2, 5], *TOK)
            lo, hi = dst_spec.head_range
            assert (report.head_start, report.head_end) == (lo, hi)
            assert all(torch.equal(g, w[:, :, lo:hi]) for g, w in zip(got, want, strict=True))
            # heads x K/V x dim x bf16 x layers x tokens
            expected_bytes = (2 if sliced else 4) * 2 * 64 * 2 * 2 * 64
            assert report.num_bytes == expected_bytes


def test_tp_two_to_one_concatenates_heads() -> None:
    full, table = source()
    dst = PagedKvCache.allocate(GQA.with_(block_size=32), 10)
    for rank in (0, 1):  # each prefill rank holds half the heads
        spec = GQA.with_(num_kv_heads=2, tp_rank=rank, tp_size=2)
        part = PagedKvCache.allocate(spec, 10)
        for layer in range(2):
            for c in range(2):
                vals = full.read_tokens(layer, c, torch.tensor(table), 0, 64)
                vals = vals[:, 2 * rank:2 * rank + 2]
                part.write_tokens(layer, c, torch.tensor(table), 0, 64, vals)
        report = convert_kv(part, table, dst, [7, 4], *TOK)
        assert (report.head_start, report.head_end) == (2 * rank, 2 * rank + 2)
    got, want = read_tokens_float(dst, [7, 4], *TOK), read_tokens_float(full, table, *TOK)
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


def test_mqa_replicated_over_tp_ranks() -> None:
    shape = KvModelShape("mqa", 2, 1, 64)
    src_spec = profile("ampere").spec_for(shape, 16)
    src, table = source(src_spec)
    for rank in (0, 1):
        dst_spec = profile("hopper").spec_for(shape, 16, tp_rank=rank, tp_size=2)
        assert dst_spec.kv_head_replicas == 2 and dst_spec.head_range == (0, 1)
        dst = PagedKvCache.allocate(dst_spec, 10)
        convert_kv(src, table, dst, [1, 2, 3, 4], *TOK)
        got, want = read_tokens_float(dst, [1, 2, 3, 4], *TOK), read_tokens_float(src, table, *TOK)
        assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


def test_wrong_tp_rank_is_incompatible_and_names_both_specs() -> None:
    src_spec = GQA.with_(num_kv_heads=2, tp_rank=0, tp_size=2)
    dst_spec = GQA.with_(num_kv_heads=2, tp_rank=1, tp_size=2)
    with pytest.raises(IncompatibleKv) as e:
        check_compatible(src_spec, dst_spec)
    assert "wrong TP rank" in str(e.value)
    assert src_spec.describe() in str(e.value) and dst_spec.describe() in str(e.value)


@pytest.mark.parametrize("change,reason", [
    ({"kind": KvKind.LATENT, "layout": KvLayout.MLA, "num_kv_heads": 1}, "latent"),
    ({"head_dim": 128}, "head_dim"),
    ({"num_layers": 3}, "layer counts"),
    ({"num_kv_heads": 8}, "head counts"),
    ({"model_fingerprint": "other"}, "different models"),
])
def test_incompatible(change: dict, reason: str) -> None:
    with pytest.raises(IncompatibleKv, match=reason):
        src = GQA.with_(model_fingerprint="m")
        check_compatible(src, src.with_(**change))


@pytest.mark.parametrize("dst_block,start", [(32, 20), (8, 20), (16, 16), (16, 21)])
def test_partial_range_leaves_other_tokens_untouched(dst_block: int, start: int) -> None:
    """Prefix reuse is exact: tokens outside [start, end) of shared destination blocks survive."""
    src, table = source()
    dst = PagedKvCache.allocate(GQA.with_(block_size=dst_block), 12)
    for t in dst.layers:
        t[0].fill_(7.0)
    dst_table = list(range(11, 11 - (-(-64 // dst_block)), -1))
    convert_kv(src, table, dst, dst_table, start, 45)
    got = read_tokens_float(dst, dst_table, 0, 64)
    want = read_tokens_float(src, table, 0, 64)
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g[:, start:45], w[:, start:45])
        assert bool((g[:, :start] == 7).all()) and bool((g[:, 45:] == 7).all())


QUANT = [
    (KvDtype.INT8, ScaleGranularity.PER_TOKEN_HEAD), (KvDtype.INT8, ScaleGranularity.PER_HEAD),
    (KvDtype.INT8, ScaleGranularity.PER_TENSOR), (KvDtype.INT4, ScaleGranularity.PER_TOKEN_HEAD),
    (KvDtype.INT4, ScaleGranularity.PER_HEAD), (KvDtype.FP8_E4M3, ScaleGranularity.PER_TOKEN_HEAD),
    (KvDtype.FP8_E4M3, ScaleGranularity.PER_HEAD), (KvDtype.FP8_E5M2, ScaleGranularity.NONE),
    (KvDtype.FP8_E5M2, ScaleGranularity.PER_TENSOR),
]


@pytest.mark.parametrize("dtype,gran", QUANT, ids=lambda v: getattr(v, "value", v))
def test_quantized_formats_round_trip(dtype: KvDtype, gran: ScaleGranularity) -> None:
    src, table = source(GQA.with_(dtype=KvDtype.FLOAT32))
    dst_spec = GQA.with_(dtype=dtype, scale_granularity=gran, layout=KvLayout.PAGED_V1,
                         int4_group_size=32, block_size=8)
    dst = PagedKvCache.allocate(dst_spec, 12)
    want = read_tokens_float(src, table, *TOK)
    calibrate_scales(dst, [w.abs().amax(dim=(1, 3)) for w in want])
    report = convert_kv(src, table, dst, list(range(11, 4, -1)), *TOK)
    assert not report.is_lossless and report.num_clamped == 0
    got = read_tokens_float(dst, list(range(11, 4, -1)), *TOK)
    rel, abs_units = tolerance(dtype)
    ids = torch.tensor(list(range(11, 4, -1)))
    for layer, (g, w) in enumerate(zip(got, want, strict=True)):
        scale: torch.Tensor | float = 1.0
        if dst.scales is not None:  # [C, T, H, G] -> per element
            scale = torch.stack([dst.read_token_scales(layer, c, ids, *TOK) for c in range(2)])
            scale = scale.repeat_interleave(64 // scale.shape[-1], dim=-1)
        assert bool(((g - w).abs() <= rel * w.abs() + abs_units * scale + 1e-6).all())
    # the same quantized cache into another layout and block size: stored bits carried exactly
    again = PagedKvCache.allocate(dst_spec.with_(layout=KvLayout.NHD, block_size=32), 4)
    if dst.scales is not None and again.scales is not None \
            and gran is not ScaleGranularity.PER_TOKEN_HEAD:
        for a, b in zip(again.scales, dst.scales, strict=True):
            a.copy_(b)
    report = convert_kv(dst, list(range(11, 4, -1)), again, [2, 3], *TOK)
    assert report.is_lossless
    carried = read_tokens_float(again, [2, 3], *TOK)
    assert all(torch.equal(a, b) for a, b in zip(carried, got, strict=True))


def test_bf16_to_volta_fp16_reports_out_of_range_values() -> None:
    shape = KvModelShape("gqa", 2, 4, 64)
    src_spec = profile("ampere").spec_for(shape, 16)
    src, table = source(src_spec)
    src.layers[1][0][0, table[1], 3, 2, 5] = 1e6  # finite in bf16, beyond fp16's 65504
    src.layers[0][0][1, table[0], 0, 0, 0] = -7e4
    dst_spec = profile("volta").adapt(src_spec)
    assert dst_spec.dtype is KvDtype.FLOAT16 and dst_spec.layout is KvLayout.PAGED_V1
    dst = PagedKvCache.allocate(dst_spec, 10)
    with pytest.raises(ValueOutOfRange) as e:
        convert_kv(src, table, dst, [0, 1, 2, 3], *TOK)
    assert e.value.num_values == 1 and "float16" in str(e.value)
    report = convert_kv(src, table, dst, [0, 1, 2, 3], *TOK,
                        options=ConvertOptions(OverflowPolicy.CLAMP))
    assert report.num_clamped == 2 and report.max_abs_clamped == pytest.approx(1e6, rel=1e-2)
    got = read_tokens_float(dst, [0, 1, 2, 3], *TOK)
    assert all(bool(torch.isfinite(g).all()) for g in got)
    assert float(got[1][0, 16 + 3, 2, 5]) == 65504.0 and float(got[0][1, 0, 0, 0]) == -65504.0


def test_profiles_know_what_they_cannot_hold() -> None:
    shape = KvModelShape("gqa", 2, 4, 64)
    with pytest.raises(IncompatibleKv, match="bfloat16"):
        profile("volta").check_spec(profile("ampere").spec_for(shape, 16))
    with pytest.raises(IncompatibleKv, match="float8"):
        profile("ampere").check_spec(profile("ada").spec_for(shape, 16))
    with pytest.raises(IncompatibleKv, match="MLA"):
        profile("turing").spec_for(KvModelShape("mla", 2, 1, 64, is_latent=True), 16)
    assert profile("ampere").adapt(profile("ada").spec_for(shape, 16)).dtype is KvDtype.BFLOAT16
    assert profile_for_sm(86).name == "ampere_sm86" and profile_for_sm(87).name == "ampere_sm86"
    assert profile_for_sm(120).name == "hopper"


def test_decode_to_tensors_lower_level_api() -> None:
    src, table = source(GQA.with_(layout=KvLayout.FLASHINFER))
    packed = pack_kv(src, table, 3, 41, request_id="r", checksum="xxh3_64", head_range=(1, 4))
    header = decode_header(packed.header.encode(), ReceiverLimits())
    buffers = packed.all_buffers()
    sums = [compute_checksum("xxh3_64", b.numpy()) for b in buffers]
    mine = GQA.with_(dtype=KvDtype.INT8, scale_granularity=ScaleGranularity.PER_TOKEN_HEAD,
                     num_kv_heads=2, tp_rank=1, tp_size=2)
    kv, report = decode_to_tensors(header, buffers, mine, checksums=sums)
    assert not report.is_lossless and (report.head_start, report.head_end) == (2, 4)
    assert (kv.head_start, kv.token_start, kv.token_end) == (2, 3, 41)
    assert kv.data[0].shape == (2, 38, 2, 64) and kv.data[0].dtype == torch.int8
    want = read_tokens_float(src, table, 3, 41)
    for i in range(2):
        err = (kv.dequantized(i) - want[i][:, :, 2:4]).abs()
        assert bool((err <= 0.5 * kv.scales[i].max() + 1e-6).all())
    with pytest.raises(Exception, match="decoded bytes"):
        decode_to_tensors(header, buffers, mine, limits=ReceiverLimits(max_decoded_bytes=1000))


def test_checksum_mismatch_is_typed() -> None:
    src, table = source()
    packed = pack_kv(src, table, *TOK, request_id="r", checksum="xxh3_64")
    header = decode_header(packed.header.encode(), ReceiverLimits())
    buffers = packed.all_buffers()
    sums = [compute_checksum("xxh3_64", b.numpy()) for b in buffers]
    sums[-1] ^= 1
    with pytest.raises(ChecksumMismatch):
        write_kv(header, buffers, PagedKvCache.allocate(GQA, 10), [0, 1, 2, 3], checksums=sums)
