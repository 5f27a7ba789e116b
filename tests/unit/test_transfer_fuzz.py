"""Hostile input to the receiver: random bytes, mutated headers, truncated/oversized/missing
frames. Only typed TransferErrors may come out, nothing is allocated beyond the receiver's
limits, and the next valid transfer still works.

CI runs a few hundred cases. The long run (>= 100k cases) is marked slow:
    PDSERVE_RECORD_FUZZ=1 python -m pytest -m slow tests/unit/test_transfer_fuzz.py
records its count and date in bench/results/transfer_fuzz.json.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import resource
import socket
import time
from pathlib import Path
from typing import Any

import msgpack
import pytest
import torch
import zmq
from hypothesis import HealthCheck, given, reject, settings
from hypothesis import strategies as st

from bench.kv_fill import fill_random
from engine.kv_spec import KvDtype, KvKind, KvLayout, KvSpec, ScaleGranularity
from transfer.convert.cache import PagedKvCache
from transfer.convert.pack import PackedKv, PackOptions, pack_kv
from transfer.convert.writer import KvWriter, PagedSink
from transfer.endpoint.receiver import ZmqKvReceiver, ZmqReceiverConfig
from transfer.endpoint.sender import ZmqKvSender
from transfer.wire import framing as proto
from transfer.wire.errors import TransferError
from transfer.wire.header import ReceiverLimits, decode_header

LIMITS = ReceiverLimits(max_header_bytes=1 << 16, max_message_bytes=1 << 20,
                        max_buffer_bytes=1 << 19, max_decoded_bytes=1 << 22, max_tokens=4096,
                        max_layers=8, max_heads=16,
                        max_head_dim=512, max_block_size=64, max_entries=4096, max_buffers=256)
DST = KvSpec(2, 2, 64, 16, dtype=KvDtype.FLOAT16, layout=KvLayout.HND)
SOURCES = [
    KvSpec(2, 2, 64, 16, dtype=KvDtype.BFLOAT16),
    KvSpec(2, 2, 64, 8, dtype=KvDtype.INT4, layout=KvLayout.PAGED_V1,
           scale_granularity=ScaleGranularity.PER_TOKEN_HEAD),
    KvSpec(2, 2, 64, 32, dtype=KvDtype.FP8_E4M3, layout=KvLayout.FLASHINFER,
           scale_granularity=ScaleGranularity.PER_HEAD),
    KvSpec(2, 1, 64, 16, dtype=KvDtype.FLOAT32, layout=KvLayout.MLA, kind=KvKind.LATENT),
]
HOSTILE = st.one_of(
    st.integers(-(2**70), 2**70), st.integers(0, 2**64), st.floats(), st.text(max_size=40),
    st.binary(max_size=40), st.booleans(), st.none(),
    st.lists(st.integers(-5, 1 << 40), max_size=12),
    st.dictionaries(st.text(max_size=6), st.integers(), max_size=3),
    st.sampled_from(["k", "v", "kv", "scale", "uint8"]),
)


def _message(i: int) -> tuple[dict, list[bytes]]:
    cache = PagedKvCache.allocate(SOURCES[i], 6)
    fill_random(cache, torch.Generator().manual_seed(i))
    packed = pack_kv(cache, [4, 1, 3, 5, 0, 2], 3, 40, request_id=f"m{i}", transfer_id=i,
                     options=PackOptions(chunk_bytes=2048 if i % 2 else 1 << 20),
                     checksum="xxh3_64" if i == 2 else None)
    buffers = [b.numpy().tobytes() for b in packed.all_buffers()]
    return msgpack.unpackb(packed.header.encode(), raw=False), buffers


MESSAGES = [_message(i) for i in range(len(SOURCES))]
VALID_SRC = PagedKvCache.allocate(SOURCES[0], 6)


def _paths(obj: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _paths(v, (*prefix, i))
    return out


def _mutate(d: dict, data: st.DataObject) -> dict:
    d = copy.deepcopy(d)
    for _ in range(data.draw(st.integers(1, 3))):
        paths = [p for p in _paths(d) if p]
        path = data.draw(st.sampled_from(paths))
        parent = d
        for key in path[:-1]:
            parent = parent[key]
        op = data.draw(st.sampled_from(["replace", "replace", "delete", "grow", "duplicate"]))
        last = path[-1]
        if op == "replace":
            parent[last] = data.draw(HOSTILE)
        elif op == "delete":
            del parent[last]
        elif op == "grow" and isinstance(parent[last], int) and not isinstance(parent[last], bool):
            parent[last] = parent[last] * data.draw(st.sampled_from([2, 1 << 20, 1 << 40])) + 1
        elif op == "duplicate" and isinstance(parent, list):
            parent.append(copy.deepcopy(parent[last]))
    return d


def _frames(buffers: list[bytes], data: st.DataObject) -> list[bytes]:
    bufs = list(buffers)
    op = data.draw(st.sampled_from(["keep", "truncate", "extend", "drop", "add", "garble"]))
    if bufs and op == "truncate":
        i = data.draw(st.integers(0, len(bufs) - 1))
        bufs[i] = bufs[i][: data.draw(st.integers(0, max(0, len(bufs[i]) - 1)))]
    elif bufs and op == "extend":
        bufs[-1] = bufs[-1] + b"\x00" * data.draw(st.integers(1, 64))
    elif bufs and op == "drop":
        bufs.pop(data.draw(st.integers(0, len(bufs) - 1)))
    elif op == "add":
        bufs.append(data.draw(st.binary(max_size=256)))
    elif bufs and op == "garble":
        i = data.draw(st.integers(0, len(bufs) - 1))
        bufs[i] = data.draw(st.binary(min_size=len(bufs[i]), max_size=len(bufs[i])))
    return bufs


def _receive(raw: bytes, buffers: list[bytes], dst: PagedKvCache) -> None:
    header = decode_header(raw, LIMITS)
    writer = KvWriter(header, PagedSink(dst, [9, 8, 7]))
    for i, buf in enumerate(buffers):
        writer.accept(i, buf, None)
    writer.finish()


def _valid_transfer_still_works(dst: PagedKvCache) -> None:
    d, buffers = MESSAGES[0]
    _receive(msgpack.packb(d, use_bin_type=True), buffers, dst)


def _one_case(data: st.DataObject, dst: PagedKvCache) -> None:
    kind = data.draw(st.sampled_from(["bytes", "header", "frames", "both"]))
    d, buffers = MESSAGES[data.draw(st.integers(0, len(MESSAGES) - 1))]
    if kind == "bytes":
        raw = data.draw(st.binary(max_size=2048))
    else:
        try:
            header = _mutate(d, data) if kind in ("header", "both") else d
            raw = msgpack.packb(header, use_bin_type=True)
        except OverflowError:  # ints beyond 64 bits cannot be put on the wire at all
            reject()
    if kind in ("frames", "both"):
        buffers = _frames(buffers, data)
    try:
        _receive(raw, buffers, dst)
    except TransferError:
        pass
    except Exception as e:  # anything untyped is a bug
        raise AssertionError(f"untyped {type(e).__name__}: {e}") from e


def _run(max_examples: int) -> int:
    dst = PagedKvCache.allocate(DST, 10)
    count = 0
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    @settings(max_examples=max_examples, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                     HealthCheck.filter_too_much])
    @given(st.data())
    def case(data: st.DataObject) -> None:
        nonlocal count
        count += 1
        _one_case(data, dst)
        if count % 50 == 0:
            _valid_transfer_still_works(dst)

    case()
    _valid_transfer_still_works(dst)
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
    # Hostile headers claim up to 2**64 bytes; the receiver may never allocate more than its
    # 1 MiB message / 4 MiB decode limits. Hypothesis' own bookkeeping grows with the number
    # of examples (~3 KiB each), hence the allowance scales with the run.
    allowed = 256 + max_examples * 3 / 1024
    assert grown_mib < allowed, f"peak memory grew by {grown_mib:.0f} MiB under hostile headers"
    return count


def test_hostile_messages_only_typed_errors() -> None:
    assert _run(300) >= 300


@pytest.mark.slow
@pytest.mark.timeout(7200)
def test_hostile_messages_long_run() -> None:
    t0 = time.time()
    count = _run(100_000)
    assert count >= 100_000
    if os.environ.get("PDSERVE_RECORD_FUZZ"):
        out = Path(__file__).resolve().parents[2] / "bench" / "results" / "transfer_fuzz.json"
        out.write_text(json.dumps({
            "test": "tests/unit/test_transfer_fuzz.py::test_hostile_messages_long_run",
            "cases": count, "untyped_errors": 0, "seconds": round(time.time() - t0, 1),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "limits": LIMITS.__dict__,
        }, indent=2) + "\n")


def test_live_receiver_survives_hostile_frames() -> None:
    """One long-lived receiver takes hostile frames from many connections; valid transfers
    interleaved with them keep succeeding."""
    dst = PagedKvCache.allocate(SOURCES[0], 10)
    rx = ZmqKvReceiver(dst, ZmqReceiverConfig(limits=LIMITS, idle_timeout_s=0.5),
                       on_complete=lambda *a: None, on_release=lambda *a: None)
    rx.start()
    ctx = zmq.Context()
    tx = ZmqKvSender(rx.endpoint, context=ctx)
    seen = 0
    frame = st.one_of(st.binary(max_size=64), st.sampled_from([b"H", b"D", b"A", b"N", b"K"]),
                      st.sampled_from([msgpack.packb(MESSAGES[0][0]), proto.pack([0, 0, None]),
                                       proto.pack([0, 5, [1, 2]]), proto.pack([[1], "x"])]))

    @settings(max_examples=150, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(frames=st.lists(frame, min_size=1, max_size=5), fresh=st.booleans())
    def case(frames: list[bytes], fresh: bool) -> None:
        nonlocal seen
        seen += 1
        raw = ctx.socket(zmq.DEALER)
        raw.setsockopt(zmq.LINGER, 0)
        raw.connect(rx.endpoint)
        raw.send_multipart(frames)
        if fresh or seen % 25 == 0:
            rid = f"valid-{seen}"
            rx.expect(rid, [1, 2, 3])
            res = tx.send(VALID_SRC, [1, 2, 3], 0, 40, request_id=rid, timeout_s=5)
            assert res.report["token_end"] == 40
        raw.close()

    try:
        case()
        assert seen >= 150
    finally:
        tx.close()
        rx.close()
        ctx.term()


def _data_connection(ctx: zmq.Context, endpoint: str) -> tuple[zmq.Socket, socket.socket]:
    """A DEALER and a paired stream data connection (STREAM → LISTEN → connect → token)."""
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 5000)
    sock.connect(endpoint)
    token = os.urandom(proto.STREAM_TOKEN_BYTES)
    sock.send_multipart([proto.STREAM_HELLO, proto.pack([token])])
    _, _, body = proto.parse_reply(sock.recv_multipart())
    data = socket.create_connection(("127.0.0.1", body["port"]), timeout=5)
    data.sendall(token)
    return sock, data


def _hostile_prefix_and_body(packed: PackedKv) -> tuple[st.SearchStrategy[bytes],
                                                         st.SearchStrategy[bytes]]:
    """Strategies for a data connection's stream prefix (mostly valid fields, some mutated) and
    the bytes after it (the payload of `packed`, truncated, extended or empty)."""
    payload = b"".join(b.numpy().tobytes() for b in packed.all_buffers())
    prefix = st.builds(proto.STREAM_PREFIX.pack,
                       st.sampled_from([proto.STREAM_MAGIC, b"PDKX", b"\0\0\0\0"]),
                       st.sampled_from([1, 1, 0, 2]),
                       st.sampled_from([0, 0, 1]), st.sampled_from([5, 5, 6, 0, 2**64 - 1]),
                       st.sampled_from([len(payload), len(payload), 0, len(payload) - 1, 2**63]))
    body = st.sampled_from([payload, payload[:100], payload + b"\0" * 9, b"",
                            payload[: len(payload) // 2]])
    return prefix, body


def _assert_drained(rx: ZmqKvReceiver, ended: dict[str, object]) -> None:
    """Nothing in flight on `rx` (no transfer, data connection or stream job) within 10 s, every
    ended transfer a report list or a typed error; then the reservations left are cancelled."""
    deadline = time.monotonic() + 10
    stream: Any = rx._paths["stream"]
    while (rx._inflight or stream._conns or stream._jobs) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not rx._inflight and not stream._conns and not stream._jobs
    assert all(isinstance(v, (list, TransferError)) for v in ended.values())
    for rid in [r for r in list(rx._expected)]:
        rx.cancel(rid)  # reservations whose payload never came in full


def test_live_receiver_survives_hostile_stream_prefixes() -> None:
    """Hostile bytes on data connections (mutated prefixes, truncated or extended payloads,
    garbage, with or without a valid header first): only typed errors, nothing left behind,
    and valid stream transfers interleaved with them keep succeeding."""
    dst = PagedKvCache.allocate(SOURCES[0], 10)
    ended: dict[str, object] = {}
    rx = ZmqKvReceiver(dst, ZmqReceiverConfig(limits=LIMITS, idle_timeout_s=0.3),
                       on_complete=lambda rid, r: ended.__setitem__(rid, r),
                       on_release=lambda rid, e: ended.__setitem__(rid, e))
    rx.start()
    ctx = zmq.Context()
    tx = ZmqKvSender(rx.endpoint, context=ctx)
    packed = pack_kv(VALID_SRC, [1, 2, 3], 0, 40, request_id="h", transfer_id=5, transport="stream")
    prefix, body = _hostile_prefix_and_body(packed)
    seen = 0

    @settings(max_examples=120, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(head=prefix, rest=body, garbage=st.binary(max_size=64), with_header=st.booleans(),
           raw_garbage=st.booleans())
    def case(head: bytes, rest: bytes, garbage: bytes, with_header: bool,
             raw_garbage: bool) -> None:
        nonlocal seen
        seen += 1
        rid = f"h{seen}"
        sock, data = _data_connection(ctx, rx.endpoint)
        if with_header:
            rx.expect(rid, [4, 5, 6])
            h = copy.deepcopy(msgpack.unpackb(packed.header.encode(), raw=False))
            h["rid"] = rid
            sock.send_multipart([proto.HEADER, msgpack.packb(h, use_bin_type=True)])
        with contextlib.suppress(OSError):
            data.sendall(garbage if raw_garbage else head + rest)
        data.close()
        sock.close()
        if seen % 20 == 0:
            valid = f"valid-{seen}"
            rx.expect(valid, [7, 8, 9])
            res = tx.send(VALID_SRC, [1, 2, 3], 0, 40, request_id=valid, timeout_s=5)
            assert res.report["token_end"] == 40

    try:
        case()
        tx.close()  # its data connection goes too
        _assert_drained(rx, ended)
        assert seen >= 120
    finally:
        tx.close()
        rx.close()
        ctx.destroy(linger=0)
