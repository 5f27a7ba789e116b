"""Transfer header: round trip, and every validation rule raising its typed error."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import msgpack
import pytest
import torch

from engine.kv_spec import KvDtype, KvKind, KvLayout, KvSpec, ScaleGranularity
from transfer.convert.cache import PagedKvCache
from transfer.convert.pack import PackOptions, pack_kv
from transfer.wire.errors import LimitExceeded, MalformedHeader, TransferError, UnsupportedVersion
from transfer.wire.header import ReceiverLimits, decode_header

SPECS = [
    KvSpec(3, 2, 64, 16, dtype=KvDtype.BFLOAT16),
    KvSpec(2, 4, 64, 8, dtype=KvDtype.INT4, layout=KvLayout.PAGED_V1,
           scale_granularity=ScaleGranularity.PER_TOKEN_HEAD, tp_rank=1, tp_size=2),
    KvSpec(2, 1, 128, 32, dtype=KvDtype.FP8_E4M3, layout=KvLayout.MLA, kind=KvKind.LATENT,
           scale_granularity=ScaleGranularity.PER_TENSOR, model_fingerprint="abc"),
    KvSpec(2, 2, 80, 16, dtype=KvDtype.FLOAT16, layout=KvLayout.FLASHINFER),
]


def packed_raw(spec: KvSpec = SPECS[0], views: bool = False, **kw: Any) -> tuple[Any, bytes]:
    cache = PagedKvCache.allocate(spec, 16)
    table = [3, 4, 5, 9, 1] if views else [7, 2, 11, 0, 5]
    opts = PackOptions(min_view_bytes=1) if views else PackOptions(chunk_bytes=4096)
    packed = pack_kv(cache, table, 5, 70 if spec.block_size == 16 else 36, request_id="req-1",
                     transfer_id=42, options=opts, meta={"first_token": 7}, **kw)
    return packed, packed.header.encode()


def mutate(raw: bytes, fn: Callable[[dict], None]) -> bytes:
    d = msgpack.unpackb(raw, raw=False)
    fn(d)
    return msgpack.packb(d, use_bin_type=True)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.layout.value}-{s.dtype.value}")
@pytest.mark.parametrize("views", [False, True])
def test_round_trip(spec: KvSpec, views: bool) -> None:
    packed, raw = packed_raw(spec, views, checksum="xxh3_64")
    h = decode_header(raw, ReceiverLimits())
    assert h == packed.header
    assert h.spec == spec and h.meta == {"first_token": 7} and h.checksum == "xxh3_64"
    assert sum(b.nbytes for b in packed.buffers) == h.payload_bytes


def test_sender_head_slice_round_trip() -> None:
    spec = KvSpec(2, 4, 64, 16, tp_size=1)
    _, raw = packed_raw(spec, head_range=(1, 3))
    h = decode_header(raw, ReceiverLimits())
    assert (h.head_start, h.head_end, h.num_heads) == (1, 3, 2)


CASES: list[tuple[str, Callable[[dict], None], type[TransferError]]] = [
    ("version", lambda d: d.update(v=1), UnsupportedVersion),
    ("rtok type", lambda d: d.update(rtok=b"x" * 16), MalformedHeader),
    ("rtok too long", lambda d: d.update(rtok="x" * 65), MalformedHeader),
    ("rtok missing", lambda d: d.pop("rtok"), MalformedHeader),
    ("bufs size over the limit", lambda d: d.update(bufs=[1 << 40] * len(d["bufs"])),
     LimitExceeded),
    ("missing key", lambda d: d.pop("tok"), MalformedHeader),
    ("unknown key", lambda d: d.update(extra=1), MalformedHeader),
    ("tid type", lambda d: d.update(tid="1"), MalformedHeader),
    ("tid negative", lambda d: d.update(tid=-1), MalformedHeader),
    ("bool as int", lambda d: d.update(tok=[True, 70]), MalformedHeader),
    ("empty token range", lambda d: d.update(tok=[5, 5]), MalformedHeader),
    ("request id empty", lambda d: d.update(rid=""), MalformedHeader),
    ("spec field type", lambda d: d["spec"].update(head_dim="64"), MalformedHeader),
    ("spec unknown field", lambda d: d["spec"].update(foo=1), MalformedHeader),
    ("spec contradiction", lambda d: d["spec"].update(kind="latent"), MalformedHeader),
    ("spec bad enum", lambda d: d["spec"].update(dtype="float64"), MalformedHeader),
    ("entry shape", lambda d: d["ent"][0][8].__setitem__(-1, 65), MalformedHeader),
    ("entry nbytes", lambda d: d["ent"][0].__setitem__(9, d["ent"][0][9] + 2), MalformedHeader),
    ("entry dtype", lambda d: d["ent"][0].__setitem__(7, "float32"), MalformedHeader),
    ("entry part", lambda d: d["ent"][0].__setitem__(0, "q"), MalformedHeader),
    ("entry outside buffer", lambda d: d["ent"][0].__setitem__(6, d["bufs"][0]), MalformedHeader),
    ("entry misaligned", lambda d: d["ent"][0].__setitem__(6, 1), MalformedHeader),
    ("coverage gap", lambda d: d["ent"].pop(), MalformedHeader),
    ("coverage overlap", lambda d: d["ent"].append(d["ent"][0]), MalformedHeader),
    ("chunks sum", lambda d: d["chunks"].append(1), MalformedHeader),
    ("heads outside sender", lambda d: d.update(heads=[0, 3]), MalformedHeader),
    ("layers beyond spec", lambda d: d.update(lay=[0, 4]), MalformedHeader),
    ("checksum algo", lambda d: d.update(sum="md5"), MalformedHeader),
    ("transport", lambda d: d.update(tr="rdma"), MalformedHeader),
    ("meta long string", lambda d: d.update(meta={"x": "s" * 1025}), MalformedHeader),
    ("meta long key", lambda d: d.update(meta={"k" * 65: 1}), MalformedHeader),
    ("meta nested too deep", lambda d: d.update(meta={"x": [[[[1]]]]}), MalformedHeader),
    ("meta nested empty too deep", lambda d: d.update(meta={"x": {"a": [[[]]]}}), MalformedHeader),
    ("meta nested key", lambda d: d.update(meta={"x": {"k" * 65: 1}}), MalformedHeader),
    ("meta nested string", lambda d: d.update(meta={"x": [["s" * 1025]]}), MalformedHeader),
    ("meta values limit", lambda d: d.update(meta={"x": [[0] * 60] * 70}), LimitExceeded),
    ("token limit", lambda d: d.update(tok=[5, 1 << 40]), LimitExceeded),
    ("buffer limit", lambda d: d["bufs"].__setitem__(0, 1 << 50), LimitExceeded),
    ("layers limit", lambda d: d["spec"].update(num_layers=5000), LimitExceeded),
    ("heads limit", lambda d: d["spec"].update(num_kv_heads=1 << 20), LimitExceeded),
]


@pytest.mark.parametrize("name,fn,error", CASES, ids=[c[0] for c in CASES])
def test_validation(name: str, fn: Callable[[dict], None], error: type[TransferError]) -> None:
    _, raw = packed_raw()
    with pytest.raises(error):
        decode_header(mutate(raw, fn), ReceiverLimits())


def test_meta_carries_typed_values_as_msgpack_structures() -> None:
    """A typed value (the first token's logprob: a map holding a list of pairs) travels as
    msgpack lists and maps, not as a JSON string; -inf logprobs included."""
    logprob = {"token_id": 7, "logprob": -0.25, "top": [[7, -0.25], [3, float("-inf")]]}
    meta = {"first_token": 7, "first_logprob": logprob, "num_cached_tokens": 16}
    packed, _ = packed_raw()
    raw = dataclasses.replace(packed.header, meta=meta).encode()
    assert msgpack.unpackb(raw)["meta"]["first_logprob"] == logprob
    assert decode_header(raw, ReceiverLimits()).meta == meta


def test_limits_checked_before_parsing() -> None:
    _, raw = packed_raw()
    with pytest.raises(LimitExceeded, match="header bytes"):
        decode_header(raw, ReceiverLimits(max_header_bytes=len(raw) - 1))
    with pytest.raises(LimitExceeded, match="message bytes"):
        decode_header(raw, ReceiverLimits(max_message_bytes=100))


@pytest.mark.parametrize("raw", [b"", b"\xc1", b"\x92\x01", b"\xdf\xff\xff\xff\xff",
                                 b"not msgpack at all", msgpack.packb([1, 2, 3]),
                                 msgpack.packb({"v": 1})])
def test_garbage(raw: bytes) -> None:
    with pytest.raises(MalformedHeader):
        decode_header(raw, ReceiverLimits())


def test_whole_blocks_numbering() -> None:
    _, raw = packed_raw()
    h = decode_header(raw, ReceiverLimits())
    assert (h.first_block, h.num_blocks, h.num_tokens) == (0, 5, 65)
    assert torch.Size(h.entries[0].shape)[1] >= 1
