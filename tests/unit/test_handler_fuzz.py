"""Hypothesis fuzzing of every control message type through the real codec into the real
handlers (decode and prefill workers on tiny engines) and of every worker event into the
proxy's `ClusterClient`: whatever a peer sends, nothing raises past a guard, a handler needs no
guard for what the codec let through (no "handler_error" is counted), and every block is free
once the worker has dropped its requests.

A frame is a valid message's fields with some of them replaced by arbitrary msgpack values
(token-id-like integers around the vocabulary's edges among them), so most frames reach deep
into the checks rather than failing at the envelope.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import msgpack
import pytest
from cluster_fakes import make_hello, reserved, tokens
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from worker_fakes import PROMPT, FakeProxy, closed_port_address, prefill, reserve

from decode.worker import DecodeWorker
from prefill.worker import PrefillWorker
from protocol import decode_ctrl as dmsg
from protocol import worker_events as ev
from protocol.codec import CTRL_VERSION, MalformedMessage, MessageFamily
from protocol.errors import ErrorCode
from protocol.rejections import Plane
from proxy.cluster import ClusterClient, ClusterConfig
from proxy.metrics import ProxyMetrics
from worker.base import WorkerBase

pytestmark = pytest.mark.usefixtures("one_torch_thread")
FUZZ = settings(max_examples=40, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])
VOCAB = 49152  # the tiny checkpoints' vocabulary (SmolLM2's: tests/conftest.py)

scalars = (st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1)
           | st.integers(VOCAB - 2, VOCAB + 2) | st.floats() | st.text(max_size=12)
           | st.binary(max_size=8))
values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=6)
    | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=12)
token_lists = st.lists(st.integers(-2, 40) | st.integers(VOCAB - 2, VOCAB + 2), max_size=80)


def raw_of(family: MessageFamily, msg: object) -> dict[str, Any]:
    return msgpack.unpackb(family.encode(msg))["d"]


@st.composite
def frames(draw: st.DrawFn, family: MessageFamily, samples: list[object]) -> bytes:
    msg = draw(st.sampled_from(samples))
    fields = raw_of(family, msg)
    for name in draw(st.lists(st.sampled_from(sorted(fields)), max_size=3, unique=True)):
        fields[name] = draw(token_lists if name.endswith("_ids") else values)
    if isinstance(fields.get("params"), dict) and fields["params"] and draw(st.booleans()):
        key = draw(st.sampled_from(sorted(fields["params"])))
        fields["params"][key] = draw(token_lists if key.endswith("_ids") else values)
    if draw(st.integers(0, 9)) == 0:
        fields[draw(st.text(max_size=5))] = draw(values)  # an unknown field
    return msgpack.packb({"t": type(msg).__name__, "v": CTRL_VERSION, "d": fields},
                         use_bin_type=True)


def deliver(worker: WorkerBase, frame: bytes) -> None:
    """The frame through the worker's own Inbox decoding (limits included), into `dispatch`."""
    try:
        msg = worker.ctrl.family.decode(frame, worker.ctrl.limits)
    except MalformedMessage as e:
        if e.request_id is not None:
            worker._on_malformed(e)
        return
    worker.dispatch(msg)
    worker.stopping = False  # a fuzzed Shutdown: the test goes on
    for _ in range(3):
        worker.guarded(worker.do_work)


def drop_all(proxy: FakeProxy, worker: WorkerBase) -> None:
    worker.dispatch(dmsg.AbortAll("fuzz"))
    deadline = time.monotonic() + 3.0  # KV on the wire to a closed port fails within 0.2 s
    while worker.engine.cache.pool.num_used and time.monotonic() < deadline:
        worker.guarded(worker.do_work)
        worker.on_idle()
        time.sleep(0.005)
    proxy.pending.clear()
    assert worker.rejections.count(Plane.CONTROL, "handler_error") == 0
    assert worker.rejections.count(Plane.CONTROL, "step_error") == 0
    assert worker.engine.cache.pool.num_used == 0


def test_fuzzed_decode_messages_never_escape_the_guards(proxy: FakeProxy,
                                                        make_worker: Any) -> None:
    d = make_worker(DecodeWorker, proxy.config("d0", kv_timeout_s=0.2))
    samples = [reserve("r", PROMPT), reserve("l", PROMPT, remote_prefill=False),
               dmsg.PrefillLocally("r"), dmsg.Abort("r"), dmsg.AbortAll(), dmsg.Shutdown()]

    @FUZZ
    @given(st.lists(frames(dmsg.DECODE_CTRL, samples), min_size=1, max_size=4))
    def run(batch: list[bytes]) -> None:
        for frame in batch:
            deliver(d, frame)
        drop_all(proxy, d)

    run()


def test_fuzzed_prefill_messages_never_escape_the_guards(proxy: FakeProxy,
                                                         make_worker: Any) -> None:
    from worker.config import KvTransportConfig

    p = make_worker(PrefillWorker, proxy.config("p0", kv=KvTransportConfig(
        transfer_timeout_s=0.2)))
    spec = p.engine.plan.spec
    samples = [prefill("r", "d0", closed_port_address(), [1, 2, 3], spec),
               dmsg.Abort("r"), dmsg.AbortAll(), dmsg.Shutdown()]

    @FUZZ
    @given(st.lists(frames(p.ctrl.family, samples), min_size=1, max_size=3))
    def run(batch: list[bytes]) -> None:
        for frame in batch:
            deliver(p, frame)
        drop_all(proxy, p)

    run()


def test_fuzzed_worker_events_never_escape_the_proxy(tmp_path: Any) -> None:
    hello = make_hello("d0", "decode", "tcp://127.0.0.1:9", "tcp://127.0.0.1:10")
    samples = [hello, reserved("r", "d0", [1, 2]), tokens("r", "d0", [5]),
               ev.Rejected("r", "d0", "full"), ev.RequestFailed("r", "d0", "x",
                                                                 ErrorCode.ABORTED),
               ev.PrefillDone("r", "d0", 0, 10, 0.1),
               ev.Heartbeat("d0", "decode", 0, 0, 0, 4, 4)]

    @FUZZ
    @given(st.lists(frames(ev.WORKER_EVENTS, samples), min_size=1, max_size=5))
    def run(batch: list[bytes]) -> None:
        async def main() -> None:
            client = ClusterClient(ClusterConfig(), ProxyMetrics())
            try:
                client.register(hello)
                for frame in batch:
                    try:
                        msg = ev.WORKER_EVENTS.decode(frame)
                    except MalformedMessage:
                        continue
                    client._handle(msg)  # no guard here: it must not raise at all
                await asyncio.sleep(0)
            finally:
                await client.close()
        asyncio.run(main())

    run()
